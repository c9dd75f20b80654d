"""People's tools reach the Access service on the store's people's port: TLS with the
store's certificate and a personal token — no client certificate per employee — while
agents' Ingest port keeps demanding mutual TLS."""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc
import pytest

from agent import certs
from agent.cli import access as access_cli
from agent.config import store_config_from_dict
from agent.pb.callrec.v1 import access_pb2 as apb
from agent.pb.callrec.v1 import access_pb2_grpc as apb_grpc
from agent.store.access import tokens
from agent.store.archive.vault import open_storage
from tests.support.access_world import PEOPLE
from tests.support.services import free_tcp_port
from tests.support.stack import InProcessStore, Keys


def _cli(*argv: str) -> int | None:
    parser = argparse.ArgumentParser(prog="callrec")
    sub = parser.add_subparsers(dest="command", required=True)
    access_cli.add_parsers(sub)
    return access_cli.dispatch(parser.parse_args(list(argv)))


def test_people_port_is_tls_with_token_and_ingest_keeps_mutual_tls(
    tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    tls = tmp_path / "tls"
    ca = certs.new_ca()
    certs.write_pair(tls, "ca", ca)
    certs.write_pair(tls, "store", certs.issue_store(ca, ["127.0.0.1"]))
    (tmp_path / "people.toml").write_text(PEOPLE)
    people_port = free_tcp_port()
    doc = {
        "store": {
            "listen": "127.0.0.1:0",
            "access_listen": f"127.0.0.1:{people_port}",
            "data_dir": str(tmp_path / "store-data"),
            "directory_file": str(tmp_path / "people.toml"),
            "seal_key_file": str(keys.seal_private),
            "tls": {
                "ca_file": str(tls / "ca.pem"),
                "cert_file": str(tls / "store.pem"),
                "key_file": str(tls / "store.key"),
            },
        }
    }
    with InProcessStore(store_config_from_dict(doc, tmp_path)) as store:
        assert store.server.access_port == people_port
        storage = open_storage(store.config)
        with storage.catalog.engine.begin() as conn:
            token = tokens.create_token(conn, "s1", "test").token
        storage.catalog.close()
        token_file = tmp_path / "token"
        token_file.write_text(token + "\n")
        client = ["--ca-file", str(tls / "ca.pem"), "--token-file", str(token_file)]

        people = f"127.0.0.1:{people_port}"
        assert _cli("search", "--purpose", "training", "--store", people, *client) == 0

        # Without a token the people's port knows nobody.
        credentials = grpc.ssl_channel_credentials((tls / "ca.pem").read_bytes())
        stub = apb_grpc.AccessStub(grpc.secure_channel(people, credentials))
        with pytest.raises(grpc.RpcError) as err:
            stub.Search(apb.SearchRequest(purpose=apb.PURPOSE_TRAINING), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # The agents' port still refuses a client without a certificate.
        assert _cli("search", "--purpose", "training", "--store", store.address, *client) == 1
        assert "UNAVAILABLE" in capsys.readouterr().err
