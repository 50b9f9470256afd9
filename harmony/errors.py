# -*- test-case-name: tests.unit.test_pipeline -*-
"""
Typed errors raised by the executor, middleware and backends.

Every error carries the HTTP status it maps to, a short machine-readable
``error`` code and a human ``message`` that is safe to show to a client
(no internals, no patient data).  Each endpoint service renders these in
its own protocol (HTTP JSON, FHIR OperationOutcome, DICOMweb, DIMSE status).
"""

import math


class HarmonyError(Exception):
    """
    Base class of every error that an endpoint knows how to render.

    @ivar status: the HTTP status code this error maps to.
    @ivar error: a short, stable, machine-readable code.
    @ivar message: a client-safe description.
    @ivar headers: extra response headers (for example C{WWW-Authenticate}).
    """

    status = 500
    error = "internal_error"
    default_message = "Internal error"

    def __init__(self, message=None, headers=()):
        self.message = message or self.default_message
        self.headers = tuple(headers)
        super().__init__(self.message)

    def __repr__(self):
        return f"{type(self).__name__}({self.message!r})"


class BadRequest(HarmonyError):
    status = 400
    error = "bad_request"
    default_message = "Bad request"


class Unauthorized(HarmonyError):
    status = 401
    error = "unauthorized"
    default_message = "Authentication required"


class Forbidden(HarmonyError):
    status = 403
    error = "forbidden"
    default_message = "Forbidden"


class NotFound(HarmonyError):
    status = 404
    error = "not_found"
    default_message = "Not found"


class MethodNotAllowed(HarmonyError):
    status = 405
    error = "method_not_allowed"
    default_message = "Method not allowed"

    def __init__(self, allowed=(), message=None):
        self.allowed = tuple(allowed)
        headers = [("Allow", ", ".join(self.allowed))] if self.allowed else []
        super().__init__(message, headers)


class NotAcceptable(HarmonyError):
    """
    None of the representations the client accepts can be produced (e.g. a
    DICOMweb transfer syntax Harmony cannot convert to).
    """

    status = 406
    error = "not_acceptable"
    default_message = "Not acceptable"


class Conflict(HarmonyError):
    status = 409
    error = "conflict"
    default_message = "Conflict"


class PayloadTooLarge(HarmonyError):
    status = 413
    error = "payload_too_large"
    default_message = "Request body too large"


class UnsupportedMediaType(HarmonyError):
    status = 415
    error = "unsupported_media_type"
    default_message = "Unsupported media type"


class TooManyRequests(HarmonyError):
    """
    A rate limit refused the request (429); C{Retry-After} says when to
    try again.

    @ivar retry_after: whole seconds until a retry may succeed (>= 1).
    """

    status = 429
    error = "too_many_requests"
    default_message = "Too many requests"

    def __init__(self, retry_after=1, message=None):
        self.retry_after = max(1, math.ceil(retry_after))
        unit = "second" if self.retry_after == 1 else "seconds"
        message = message or f"Too many requests: retry after {self.retry_after} {unit}"
        super().__init__(message, [("Retry-After", str(self.retry_after))])


class InternalError(HarmonyError):
    status = 500
    error = "internal_error"
    default_message = "Internal error"


class UpstreamUnavailable(HarmonyError):
    """
    The backend could not be reached or failed before answering (502).
    Ordered failover tries the next backend on this error.
    """

    status = 502
    error = "bad_gateway"
    default_message = "Upstream unavailable"


class ServiceUnavailable(HarmonyError):
    status = 503
    error = "service_unavailable"
    default_message = "Service unavailable"


class UpstreamTimeout(HarmonyError):
    status = 504
    error = "gateway_timeout"
    default_message = "Upstream timed out"


def as_harmony_error(failure_or_exception):
    """
    Turn any exception (or L{twisted.python.failure.Failure}) into a
    L{HarmonyError}; unknown exceptions become an opaque L{InternalError}.
    """
    exc = getattr(failure_or_exception, "value", failure_or_exception)
    if isinstance(exc, HarmonyError):
        return exc
    return InternalError()
