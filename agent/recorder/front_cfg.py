"""The Kamailio 5.6 script of the SIP front, with ``%NAME%`` placeholders that
:func:`agent.recorder.front.render_config` fills from the agent's ``[sip]`` config.
Why it routes as it does: see :mod:`agent.recorder.front`."""

TEMPLATE = r"""#!KAMAILIO
# callrec SIP front: spreads new SIPREC INVITEs over the recorder workers.
# Rendered by the agent (agent/recorder/front.py) from its [sip] config at every
# start: edit the agent's config, not this file.

debug=2
corelog=3          # core parse errors print whole messages: only at debug level
log_stderror=yes
log_prefix=""
children=2
tcp_children=2
auto_aliases=no
dns=no
rev_dns=no
dns_try_ipv6=no
use_dns_cache=off
server_signature=no
sip_warning=0
listen=udp:%LISTEN%:%PORT%
listen=tcp:%LISTEN%:%PORT%
tcp_connection_lifetime=3605

loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "pv.so"
loadmodule "xlog.so"
loadmodule "dispatcher.so"
loadmodule "ctl.so"

modparam("ctl", "binrpc", "%CTL%")
modparam("tm", "fr_timer", %FR_MS%)
modparam("tm", "fr_inv_timer", %FR_INV_MS%)
# A CANCEL reaches a worker even before its 100 Trying (a stalled worker then sees
# INVITE and CANCEL together and records nothing).
modparam("tm", "cancel_b_method", 2)
modparam("tm", "failure_reply_mode", 3)
modparam("rr", "append_fromtag", 0)
modparam("dispatcher", "list_file", "%LIST%")
modparam("dispatcher", "flags", 2)
modparam("dispatcher", "xavp_dst", "_dsdst_")
modparam("dispatcher", "xavp_ctx", "_dsctx_")
modparam("dispatcher", "ds_hash_size", 9)
modparam("dispatcher", "ds_hash_expire", %EXPIRE_S%)
modparam("dispatcher", "ds_hash_initexpire", 60)
modparam("dispatcher", "ds_hash_check_interval", 10)
modparam("dispatcher", "ds_ping_interval", %PING_S%)
modparam("dispatcher", "ds_probing_mode", 1)
modparam("dispatcher", "ds_probing_threshold", 1)
modparam("dispatcher", "ds_inactive_threshold", 1)
modparam("dispatcher", "ds_ping_from", "sip:callrec-front@%LISTEN%")
modparam("dispatcher", "ds_ping_reply_codes", "class=2")
modparam("dispatcher", "ds_timer_mode", 1)

request_route {
    if (!mf_process_maxfwd_header("10")) {
        sl_send_reply("483", "Too Many Hops");
        exit;
    }
    if (has_totag()) {
        route(IN_DIALOG);
        exit;
    }
    if (is_method("CANCEL")) {
        if (t_check_trans()) {
            t_relay();
        }
        exit;
    }
    if (is_method("ACK")) {
        t_check_trans();
        exit;
    }
    t_check_trans();
    if (is_method("OPTIONS")) {
        sl_send_reply("200", "OK");
        exit;
    }
    if (!is_method("INVITE")) {
        sl_send_reply("405", "Method Not Allowed");
        exit;
    }
    remove_hf("Route");
    record_route();
    route(DISPATCH);
}

route[DISPATCH] {
    if (!ds_select_dst("%SET%", "10")) {
        xlog("L_WARN", "event=front_refused call_ref=%REF% status=503 reason=no_worker\n");
        sl_send_reply("503", "No recorder available");
        exit;
    }
    xlog("L_INFO", "event=front_dispatched call_ref=%REF% worker=%W%\n");
    route(RELAY);
}

route[RELAY] {
    t_on_failure("FAILOVER");
    t_on_reply("ANSWERED");
    if (!t_relay()) {
        ds_load_unset();
        sl_reply_error();
    }
    exit;
}

route[IN_DIALOG] {
    if (!loose_route()) {
        if (is_method("ACK") && t_check_trans()) {
            t_relay();
        } else if (!is_method("ACK")) {
            sl_send_reply("404", "Not here");
        }
        exit;
    }
    if (is_method("BYE")) {
        t_check_trans();  # a retransmission ends here: off-load once
        ds_load_update();
    }
    if (!t_relay()) {
        sl_reply_error();
    }
}

onreply_route[ANSWERED] {
    if (status =~ "^2[0-9][0-9]$" && $rm == "INVITE") {
        ds_load_update();
    }
}

failure_route[FAILOVER] {
    if (t_is_canceled()) {
        ds_load_unset();
        exit;
    }
    if (!(t_check_status("408|480|486|5[0-9][0-9]") || t_branch_timeout())) {
        ds_load_unset();
        exit;
    }
    $var(status) = "timeout";
    if (t_check_status("486")) {
        $var(status) = "486";
    } else if (t_check_status("480")) {
        $var(status) = "480";
    } else if (t_check_status("503")) {
        $var(status) = "503";
    } else if (t_check_status("5[0-9][0-9]")) {
        $var(status) = "5xx";
    } else if (t_branch_timeout() && !t_branch_replied()) {
        ds_mark_dst("ip");
    }
    if ($xavp(_dsdst_[1]=>uri) != $null) {
        xlog("L_WARN", "event=front_failover call_ref=%REF% worker=%W% status=%ST% next=%NEXT%\n");
        if (ds_next_dst()) {
            route(RELAY);
        }
    }
    ds_load_unset();
    xlog("L_WARN", "event=front_refused call_ref=%REF% status=503 reason=all_refused last=%ST%\n");
    t_reply("503", "No recorder available");
}
"""
