"""The Kamailio 5.6 script of the SIP front, with ``%NAME%`` placeholders that
:func:`agent.recorder.front.files.render_config` fills from the agent's ``[sip]`` config.
Why it routes as it does: see :mod:`agent.recorder.front.files`."""

TEMPLATE = r"""#!KAMAILIO
# callrec SIP front: spreads new SIPREC INVITEs over the recorder workers.
# Rendered by the agent (agent/recorder/front/files.py) from its [sip] config at every
# start: edit the agent's config, not this file.

debug=2
corelog=3          # core parse errors at debug level; what else prints message
                   # content goes through `callrec front-log` (agent.recorder.front.logfilter)
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
listen=tcp:%HTTP_LISTEN%:%HTTP_PORT%
%TLS_LISTEN%
tcp_connection_lifetime=3605
# A TCP message is read whole before the script sees it: up to tcp_rd_buf_size per
# connection (shared memory, touched only as data arrives), so that one far larger
# than [sip] max_message (a 2 MB INVITE) is still answered 513 rather than its
# connection dropped; -m covers every connection's buffer. $var values and the
# metadata kept aside are up to max_message.
tcp_rd_buf_size=%TCP_BUF%
tcp_max_connections=%TCP_MAX%
pv_buffer_size=%PV_BUF%

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
loadmodule "htable.so"
loadmodule "xhttp.so"
loadmodule "cfgutils.so"
%TLS_MODULE%

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
# Recording metadata kept aside (in memory only) until the worker fetches it.
modparam("htable", "htable", "meta=>size=8;autoexpire=%META_EXPIRE_S%;")
modparam("htable", "htable", "refused=>size=8;autoexpire=60;")

request_route {
    if ($Rp == %HTTP_PORT%) {
        exit;  # the metadata port speaks HTTP only
    }
    if (!%ALLOWED% && !(src_ip == %WORKERS% && has_totag())) {
        if (!is_method("ACK")) {  # an ACK gets no answer (it may end a refusal)
            # One line per source address a minute: a flood cannot fill the journal.
            if ($sht(refused=>$si) == $null) {
                $sht(refused=>$si) = 1;
                xlog("L_WARN", "%REFUSED%403 reason=client_not_allowed source=$si method=$rm\n");
            }
            sl_send_reply("403", "Not a recording client");
        }
        exit;
    }
    if ($ml > %MAX_MSG%) {
        xlog("L_WARN", "%REFUSED%513 reason=message_too_large bytes=$ml source=$si\n");
        sl_send_reply("513", "Message Too Large");
        exit;
    }
    if (!mf_process_maxfwd_header("10")) {
        sl_send_reply("483", "Too Many Hops");
        exit;
    }
    remove_hf("%RECEIVED_HDR%");  # only the front says when it received a request
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
    remove_hf("%SOURCE_HDR%");
    append_hf("%SOURCE_HDR%: $si\r\n");
    route(KEEP_METADATA);
    route(DISPATCH);
}

# The metadata part leaves the request (pjsip in the workers reads ~4,000 bytes of a
# message at most) and waits here, in memory, under a random token the worker
# fetches it with (GET %META_PATH%<token> on the loopback HTTP port).
route[KEEP_METADATA] {
    remove_hf("%META_HDR%");
    if (!(is_method("INVITE|UPDATE") && has_body("multipart/mixed"))) {
        return;
    }
    if (!get_body_part("application/rs-metadata+xml", "$var(meta)")) {
        return;
    }
    $var(tok) = $(ci{s.md5}{s.substr,0,12}) + "-" + $RANDOM + "-" + $RANDOM;
    $sht(meta=>$var(tok)) = $var(meta);
    remove_body_part("application/rs-metadata+xml");
    append_hf("%META_HDR%: $var(tok)\r\n");
}

event_route[xhttp:request] {
    if ($Rp != %HTTP_PORT% || !(src_ip == 127.0.0.0/8 || src_ip == ::1)) {
        xhttp_reply("403", "Forbidden", "", "");
        exit;
    }
    if ($hu =~ "^%META_PATH%[A-Za-z0-9-]+$") {
        $var(tok) = $(hu{s.substr,%META_PATH_LEN%,0});
        if ($sht(meta=>$var(tok)) != $null) {
            $var(meta) = $sht(meta=>$var(tok));
            $sht(meta=>$var(tok)) = $null;
            xhttp_reply("200", "OK", "application/rs-metadata+xml", "$var(meta)");
            exit;
        }
    }
    xhttp_reply("404", "Not Found", "", "");
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
        # The call ends now: a worker starved of CPU may read this BYE late (and
        # answers it late: the SRC gets its 200, not a 408 after fr_timer).
        append_hf("%RECEIVED_HDR%: $TV(Sn)\r\n");
        t_set_fr(0, %BYE_FR_MS%);
    }
    route(KEEP_METADATA);
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

# [sip] tls_port: recording clients over TLS must present a certificate our CA signed.
TLS_TEMPLATE = """# Rendered by callrec from [sip] tls_*; do not edit.
[server:default]
method = TLSv1.2+
verify_certificate = yes
require_certificate = yes
certificate = %CERT%
private_key = %KEY%
ca_list = %CA%
"""
