"""The pjsua2 adapter: the only package that imports pjsua2 (``endpoint``: the
library, its log and configs; ``call``: the ``Account``/``Call`` adapters and the
session of one call; ``engine``: the calls and what is recorded of them;
``closing``: ended calls until their capture is in ``ready``).

One thread owns pjsua2 (``threadCnt = 0``, ``mainThreadOnly``) and drives it with
:meth:`SipEngine.poll`. pjsua2 callbacks only translate what happened into our own
events on a deque; ``poll`` handles them after ``libHandleEvents`` returns, so no
Python error is ever raised through a SWIG director. Exception: a disconnected
``Call`` is released inside its own ``onCallState`` (the pattern pjsua2 documents),
before pjsua can reuse its call slot for a new INVITE. What is written to disk is
decided in :mod:`agent.recorder.session` (no pjsua2 there).

Measured pjsua2 facts built in (wheel ``pjsua2-python`` 2.15.1, see DESIGN.md):
``PJSUA_MAX_CALLS = 4`` (a fifth INVITE gets 486 from pjsua itself); ``siprec`` must
be added to Supported or ``Require: siprec`` gets 420; answer with
``opt.audioCount = <audio m-lines>``; SIPREC streams are ``REMOTE_HOLD`` (the offer is
sendonly); clock rate 8000; Python references to every Call/Account/recorder, all
dropped before ``libDestroy``; pjsua has no RTP timeout of its own; a recorder's WAV
is closed ~10-20 ms after its last reference drops; ``str(pj.Error)`` is empty (use
``exc.info()``); hold the ``CallInfo`` in a local while iterating its media.

In-dialog requests: pjsua answers re-INVITEs and UPDATEs itself (hold, resume,
session-timer refreshes keep the recorders: they are re-connected on every media
change). One that carries recording metadata (a transfer) is read in
``onCallTsxState`` and merged into the capture (:func:`party_updates.apply_update`).
A CANCEL that arrives before we answered leaves nothing behind.
"""

from agent.recorder.session import call_ref
from agent.recorder.sip.call import CallSession
from agent.recorder.sip.engine import SipEngine

__all__ = ["CallSession", "SipEngine", "call_ref"]
