"""A small PKI for tests and benches, as `callrec certs` makes it: a CA, the store's
certificate and one agent's for ``SITE``, with the config sections and the gRPC
credentials that use them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from agent import certs

SITE = "hel-1"
AGENT = f"agent-{SITE}"


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca: certs.Issued

    def files(self, stem: str) -> dict[str, object]:
        d = self.directory
        return {"ca_file": str(d / "ca.pem"), "cert_file": str(d / f"{stem}.pem"),
                "key_file": str(d / f"{stem}.key")}  # fmt: skip

    @property
    def store_tls(self) -> dict[str, object]:
        return self.files("store")

    @property
    def agent_uplink(self) -> dict[str, object]:
        return {"insecure": False, **self.files(AGENT)}

    def add_agent(self, site: str) -> str:
        """Issue and write another site's agent certificate; its file stem."""
        stem = f"agent-{site}"
        certs.write_pair(self.directory, stem, certs.issue_agent(self.ca, site))
        return stem

    def credentials(self, stem: str = AGENT) -> grpc.ChannelCredentials:
        """The mutual-TLS client credentials of the certificate ``stem``."""
        d = self.directory
        return certs.channel_credentials(d / "ca.pem", d / f"{stem}.pem", d / f"{stem}.key")


def make_pki(directory: Path) -> Pki:
    """A CA, the store's certificate and one agent certificate for SITE."""
    ca = certs.new_ca()
    certs.write_pair(directory, "ca", ca)
    certs.write_pair(directory, "store", certs.issue_store(ca))
    pki = Pki(directory, ca)
    pki.add_agent(SITE)
    return pki
