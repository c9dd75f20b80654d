"""The SIP front: the Kamailio dispatcher the agent runs before its workers, its
config template, its log filter, and the SIP edge's checks on who may record."""
