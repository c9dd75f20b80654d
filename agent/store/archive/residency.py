"""Data residency: the regions the store may keep personal data in.

The privacy notice says no personal data leaves the EU/EEA. A region is either an
ISO 3166 country code (``fi``, where the store or an agent runs) or an object-storage
region name (``eu-north-1``). The default list names only EU/EEA places; a wildcard such
as ``eu-*`` is deliberately not in it, because AWS ``eu-west-2`` is London and
``eu-central-2`` is Zurich, both outside the EU/EEA.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

# The 27 EU member states and the three EEA EFTA states (ISO 3166-1 alpha-2).
EU_EEA_COUNTRIES = (
    "at", "be", "bg", "cy", "cz", "de", "dk", "ee", "es", "fi", "fr", "gr", "hr", "hu",
    "ie", "it", "lt", "lu", "lv", "mt", "nl", "pl", "pt", "ro", "se", "si", "sk",
    "is", "li", "no",
)  # fmt: skip

# AWS regions located in EU member states (London and Zurich are not).
EU_S3_REGIONS = (
    "eu-north-1",  # Stockholm
    "eu-central-1",  # Frankfurt
    "eu-west-1",  # Ireland
    "eu-west-3",  # Paris
    "eu-south-1",  # Milan
    "eu-south-2",  # Spain
    "eusc-de-east-1",  # AWS European Sovereign Cloud, Brandenburg
)

DEFAULT_ALLOWED_REGIONS = EU_EEA_COUNTRIES + EU_S3_REGIONS

_REGION = re.compile(r"[a-z0-9*?][a-z0-9*?-]{0,62}")


class ResidencyError(ValueError):
    """Personal data would be kept outside the allowed regions."""


def valid_region_pattern(value: str) -> bool:
    return bool(_REGION.fullmatch(value))


def region_allowed(region: str, allowed: Iterable[str]) -> bool:
    """Exact (case-insensitive) match or a shell-style pattern such as ``fr-*``."""
    name = region.strip().lower()
    if not name or not _REGION.fullmatch(name) or "*" in name or "?" in name:
        return False
    return any(fnmatch.fnmatchcase(name, pattern.lower()) for pattern in allowed)


_AWS_HOST = re.compile(
    r"^(?:[a-z0-9.-]+\.)?s3(?:[.-]dualstack)?[.-]([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?$"
)


def aws_endpoint_region(host: str) -> str | None:
    """The region an AWS S3 host name names (``s3.eu-north-1.amazonaws.com`` →
    ``eu-north-1``); ``None`` for a host that is not AWS or names no region."""
    host = host.lower().rstrip(".")
    match = _AWS_HOST.match(host)
    if match is None:
        return None
    region = match.group(1)
    return None if region in ("external-1", "accelerate") else region


def is_aws_host(host: str) -> bool:
    host = host.lower().rstrip(".")
    return host == "amazonaws.com" or host.endswith(".amazonaws.com")
