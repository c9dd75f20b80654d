"""A real SIPREC test call, for the demo (``demo``: ``callrec demo``), the tests and the
benchmarks: SIPp as the recording client, one process sending the RTP, espeak-ng
speech. Needs the `sip-tester`, `espeak-ng` and `sox` packages.

Harness, not product: the Debian package leaves this folder out, and ``callrec``
offers ``demo`` only where it is installed (``agent.cli.main.demo_installed``)."""

from agent.testcall.sipp import SippResult, SiprecCall, free_port, run_sipp, siprec_scenario
from agent.testcall.speech import Speech, make_speech

__all__ = [
    "SippResult",
    "SiprecCall",
    "Speech",
    "free_port",
    "make_speech",
    "run_sipp",
    "siprec_scenario",
]
