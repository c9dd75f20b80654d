"""One frozen config per daemon, read from TOML and validated once at start.

Every error names the key and what was expected, e.g.
``[store] retention = "6 monts": expected e.g. "6 months"``.

``agent.config.recorder`` reads the agent's file (its ``[sip]`` section:
``agent.config.sip``), ``agent.config.store`` the store's, and
``agent.config.parsing`` holds the typed reads they share (with the web's
``agent.web.config`` and the people's CLI profile). Import from here.
"""

from agent.config.parsing import (
    LOG_LEVELS,
    ConfigError,
    KeyRead,
    TlsConfig,
    is_loopback,
    parse_duration,
    parse_months,
    toml_value,
    tracing_reads,
)
from agent.config.recorder import (
    AGENT_SECTIONS,
    AUDIO_FORMATS,
    AgentConfig,
    AudioConfig,
    ControlConfig,
    FreeSpaceFloor,
    PrivacyConfig,
    SpoolConfig,
    UplinkConfig,
    agent_config_from_dict,
    check_transport,
    load_agent_config,
)
from agent.config.sip import (
    LOOPBACK_CLIENTS,
    MAX_SIP_MESSAGE,
    WORKER_MAX_CALLS,
    SipClient,
    SipConfig,
)
from agent.config.store import (
    KeysConfig,
    S3Config,
    StoreConfig,
    StoreOidcConfig,
    load_store_config,
    store_config_from_dict,
)

__all__ = [
    "AGENT_SECTIONS",
    "AUDIO_FORMATS",
    "LOG_LEVELS",
    "LOOPBACK_CLIENTS",
    "MAX_SIP_MESSAGE",
    "WORKER_MAX_CALLS",
    "AgentConfig",
    "AudioConfig",
    "ConfigError",
    "ControlConfig",
    "FreeSpaceFloor",
    "KeyRead",
    "KeysConfig",
    "PrivacyConfig",
    "S3Config",
    "SipClient",
    "SipConfig",
    "SpoolConfig",
    "StoreConfig",
    "StoreOidcConfig",
    "TlsConfig",
    "UplinkConfig",
    "agent_config_from_dict",
    "check_transport",
    "is_loopback",
    "load_agent_config",
    "load_store_config",
    "parse_duration",
    "parse_months",
    "store_config_from_dict",
    "toml_value",
    "tracing_reads",
]
