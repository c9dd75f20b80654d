"""What a client is told when the store fails: a gRPC status per kind of failure and a
generic message, never the exception's text (which may hold SQL, paths or key ids).

``status_of`` maps the store's own failures:

- a data key that was shredded → NOT_FOUND (the recording is gone for good);
- a data key that does not open (``KeyWrapError``), a blob that fails
  authentication (``CryptoError``) or is missing (``BlobNotFound``) → DATA_LOSS;
- a missing or unusable key file (``KeyFileError``) → FAILED_PRECONDITION;
- the catalog or the blob store not answering (``OperationalError``, ``OSError``,
  botocore's connection errors) → UNAVAILABLE (retryable);
- anything else → INTERNAL.

The full exception goes to the log (type and message, no traceback) with a short
reference the client also gets, so an operator can find it.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import sqlalchemy.exc

from agent import logs
from agent.privacy import KeyFileError
from agent.store.archive.blobs import BlobNotFound
from agent.store.archive.crypto import CryptoError
from agent.store.archive.vault import KeyShredded
from agent.store.keys.master import KeyWrapError

log = logs.get_logger(__name__)

MAX_REQUEST_ID = 64  # longest id a client may name; longer is refused unread


@dataclass(frozen=True)
class Failure:
    code: grpc.StatusCode
    message: str  # safe to show a client
    outcome: str  # for the audit log
    ref: str  # the log line's reference

    @property
    def client_message(self) -> str:
        return f"{self.message} (store log ref={self.ref})"


def status_of(exc: BaseException) -> Failure:
    """The status and generic message for an unexpected exception."""
    ref = secrets.token_hex(4)
    if isinstance(exc, KeyShredded):
        return Failure(grpc.StatusCode.NOT_FOUND, "the recording was destroyed", "not_found", ref)
    if isinstance(exc, KeyWrapError | CryptoError | BlobNotFound):
        message = "the recording's stored audio or key cannot be read"
        return Failure(grpc.StatusCode.DATA_LOSS, message, "error", ref)
    if isinstance(exc, KeyFileError):
        message = "the store cannot use its key files"
        return Failure(grpc.StatusCode.FAILED_PRECONDITION, message, "error", ref)
    if _transient(exc):
        message = "the store's catalog or blob storage is not answering; retry later"
        return Failure(grpc.StatusCode.UNAVAILABLE, message, "error", ref)
    return Failure(grpc.StatusCode.INTERNAL, "internal error in the store", "error", ref)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.TimeoutError):
        return True
    if isinstance(exc, OSError):
        return True
    module = type(exc).__module__
    return module.startswith(("botocore", "urllib3")) and "Connect" in type(exc).__name__


def bounded_id(value: str, limit: int = MAX_REQUEST_ID) -> str:
    """A client-given id fit for a log line: as is when short, else cut and marked."""
    return value if len(value) <= limit else f"{value[:limit]}…[{len(value)} chars]"


# ---------------------------------------------------------------- the boundary

Context = grpc.aio.ServicerContext[Any, Any]
OnFailure = Callable[[Context, Exception, str], Awaitable[None]]


async def answer_failure(context: Context, exc: Exception, method: str) -> None:
    """The default: log the failure with its reference, answer generically."""
    failure = status_of(exc)
    log.error(
        "rpc_failed",
        method=method,
        code=failure.code.name,
        ref=failure.ref,
        error=f"{type(exc).__name__}: {str(exc)[:300]}",
    )
    await context.abort(failure.code, failure.client_message)


class ErrorBoundary(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps every handler of a server: an exception a handler did not turn into a
    status becomes ``status_of``'s (never gRPC's ``UNKNOWN: Unexpected <class …>``
    with the exception's text). ``on_failure`` per method prefix (the Access service
    audits the failure); others get ``answer_failure``."""

    def __init__(self, on_failure: dict[str, OnFailure] | None = None) -> None:
        self.on_failure = dict(on_failure or {})

    def add(self, prefix: str, handler: OnFailure) -> None:
        self.on_failure[prefix] = handler

    def _handler_for(self, method: str) -> OnFailure:
        for prefix, handler in self.on_failure.items():
            if method.startswith(prefix):
                return handler
        return answer_failure

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        fail = self._handler_for(method)
        if handler.unary_unary or handler.stream_unary:
            inner: Any = handler.unary_unary or handler.stream_unary

            async def unary(request: Any, context: Context) -> Any:
                try:
                    return await inner(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await fail(context, exc, method)
                    raise

            make = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary
                else grpc.stream_unary_rpc_method_handler
            )
            return make(unary, handler.request_deserializer, handler.response_serializer)
        streaming: Any = handler.unary_stream or handler.stream_stream

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                async for item in streaming(request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await fail(context, exc, method)
                raise

        make_stream = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream
            else grpc.stream_stream_rpc_method_handler
        )
        return make_stream(stream, handler.request_deserializer, handler.response_serializer)
