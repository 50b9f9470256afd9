# -*- test-case-name: tests.unit.test_rate_limit -*-
"""
C{rate_limit}: token-bucket rate limiting per client, per JWT subject, per
calling AE title, per header or metadata value, or for all requests.

Options::

    [middleware.limit.options]
    key = "client_ip"    # client_ip | jwt_subject | global | calling_aet
                         # | header:<name> | metadata:<key>
    rate = 10.0          # tokens added per second (> 0); required
    burst = 20           # bucket size (>= 1); default: one second's worth of rate
    max_keys = 100000    # buckets kept; the least recently used are dropped

Every key has a bucket of C{burst} tokens (a new key starts full); each
request takes one, and the bucket refills at C{rate} tokens per second.  A
request that finds no token is refused with L{TooManyRequests} (HTTP
C{429} with C{Retry-After}: the whole seconds until a token is back, at
least 1; FHIR endpoints answer an OperationOutcome, DIMSE requesters get
C{A700} "Refused: Out of resources").  Refused requests take no token.

Keys:

  - C{client_ip}: the peer's address (C{details.client}; behind a reverse
    proxy that is the proxy's);
  - C{jwt_subject}: C{jwt.sub} as a C{jwt_auth} middleware placed before
    this one verified it; requests without one are limited under their
    client address;
  - C{calling_aet}: the calling AE title of DIMSE requests; HTTP requests
    are limited under their client address;
  - C{header:<name>} (first value), C{metadata:<key>}: requests without it
    are limited under their client address;
  - C{global}: one bucket for every request through this middleware.

A DIMSE C-STORE takes one token per instance (each is one request), C-FIND,
C-GET and C-MOVE one per operation; C-ECHO is answered by the SCP and is not
limited.  The SCP's C{max_associations_per_aet} limits concurrent
associations per calling AE title.

Refusals are logged at most once a minute per key, naming the kind of key
and, for client addresses and AE titles, the value (never a JWT subject,
header or metadata value: they may identify a patient).

L{TokenBuckets} is the clock-free core.
"""

import math
import re
import time
from collections import OrderedDict

from zope.interface import implementer

from harmony.config.schema import Field, Int, Number, Schema, Str
from harmony.errors import TooManyRequests
from harmony.interfaces import IMiddleware
from harmony.logs import logger
from harmony.registry import MiddlewareType

log = logger("harmony.middleware.rate_limit")

#: Metadata key of the verified JWT subject (set by C{jwt_auth}).
METADATA_JWT_SUB = "jwt.sub"

#: Key kinds without an argument.
SIMPLE_KEYS = ("client_ip", "jwt_subject", "global", "calling_aet")

#: A refusal is logged at most this often (seconds) per key.
LOG_INTERVAL_SECS = 60.0

#: Float slack when comparing token counts (refills add up fractions).
_EPSILON = 1e-9

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


# -- the core ------------------------------------------------------------------


class TokenBuckets:
    """
    Token buckets by key, at most C{max_keys} of them (least recently used
    dropped first); no clock of its own: callers pass the time.

    @param rate: tokens added per second (> 0).
    @param burst: bucket size (>= 1).
    @param max_keys: buckets kept (>= 1).
    """

    def __init__(self, rate, burst, max_keys):
        if rate <= 0:
            raise ValueError("rate must be > 0")
        if burst < 1:
            raise ValueError("burst must be >= 1")
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_keys = max_keys
        # key -> [tokens, last refill time, last time a refusal was logged]
        self._buckets = OrderedDict()

    def __len__(self):
        return len(self._buckets)

    def __contains__(self, key):
        return key in self._buckets

    def tokens(self, key, now):
        """
        The tokens C{key}'s bucket holds at C{now} (C{burst} for an unknown
        key), without taking one.
        """
        bucket = self._buckets.get(key)
        if bucket is None:
            return self.burst
        return self._refilled(bucket, now)

    def _refilled(self, bucket, now):
        elapsed = now - bucket[1]
        if elapsed <= 0:
            return bucket[0]
        return min(self.burst, bucket[0] + elapsed * self.rate)

    def take(self, key, now):
        """
        Take a token from C{key}'s bucket.

        @param now: the time in seconds (any monotonic origin).
        @return: C{0.0} when a token was taken, otherwise the seconds until
            one is available (> 0).
        """
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = [self.burst, now, None]
            while len(buckets) > self.max_keys:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(key)
            bucket[0] = self._refilled(bucket, now)
            bucket[1] = max(bucket[1], now)
        if bucket[0] >= 1.0 - _EPSILON:
            bucket[0] = max(0.0, bucket[0] - 1.0)
            return 0.0
        return (1.0 - bucket[0]) / self.rate

    def should_log(self, key, now, interval=LOG_INTERVAL_SECS):
        """
        Whether a refusal for C{key} should be logged now (at most once per
        C{interval} per key); records it when so.
        """
        bucket = self._buckets.get(key)
        if bucket is None:
            return True
        if bucket[2] is not None and now - bucket[2] < interval:
            return False
        bucket[2] = now
        return True


def retry_after_secs(wait):
    """
    C{Retry-After} for a wait of C{wait} seconds: whole seconds, rounded
    up, at least 1.
    """
    return max(1, math.ceil(wait - _EPSILON))


# -- keys ----------------------------------------------------------------------


def check_key(spec):
    """
    @return: C{None} when C{spec} is a valid C{key} option, else an error
        message.
    """
    if spec in SIMPLE_KEYS:
        return None
    kind, sep, arg = spec.partition(":")
    if sep and kind == "header":
        if not _TOKEN.match(arg):
            return f"header:<name> needs an HTTP header name, got {spec!r}"
        return None
    if sep and kind == "metadata":
        if not arg.strip():
            return f"metadata:<key> needs a metadata key, got {spec!r}"
        return None
    return f"expected one of {', '.join(SIMPLE_KEYS)}, header:<name> or metadata:<key>, got {spec!r}"


def _client_key(envelope, why=""):
    client = envelope.details.client
    host = client[0] if client and client[0] else "unknown"
    return "ip:" + host, f"client {host}{why}"


def key_function(spec):
    """
    A function C{envelope -> (bucket key, log label)} for a C{key} option.
    The label never holds a JWT subject, header or metadata value.
    """
    if spec == "client_ip":
        return _client_key
    if spec == "global":
        return lambda envelope: ("global", "all requests")
    if spec == "jwt_subject":

        def subject(envelope):
            sub = envelope.metadata.get(METADATA_JWT_SUB)
            if sub:
                return "sub:" + sub, "a JWT subject"
            return _client_key(envelope, " (no JWT subject)")

        return subject
    if spec == "calling_aet":

        def calling_aet(envelope):
            dicom = envelope.dicom
            aet = getattr(dicom, "calling_aet", None) if dicom is not None else None
            if aet:
                return "aet:" + aet, f"calling AE {aet}"
            return _client_key(envelope)

        return calling_aet
    kind, _, arg = spec.partition(":")
    if kind == "header":

        def header(envelope):
            value = envelope.details.headers.get(arg)
            if value:
                return "header:" + value, f"a {arg} header value"
            return _client_key(envelope, f" (no {arg} header)")

        return header
    if kind == "metadata":

        def metadata(envelope):
            value = envelope.metadata.get(arg)
            if value:
                return "metadata:" + str(value), f"a {arg} metadata value"
            return _client_key(envelope, f" (no {arg} metadata)")

        return metadata
    raise ValueError(check_key(spec))


# -- options -------------------------------------------------------------------


def _check(options, where):
    if not (math.isfinite(options.rate) and options.rate > 0):
        raise where.child("rate").error(f"must be a finite number greater than 0, got {options.rate:g}")


OPTIONS = Schema(
    {
        "key": Field(
            Str(nonempty=True, check=check_key),
            "client_ip",
            "client_ip | jwt_subject | global | calling_aet | header:<name> | metadata:<key>",
        ),
        "rate": Field(Number(), doc="tokens added per second (> 0)"),
        "burst": Field(Int(min=1), None, "bucket size; default: one second's worth of rate"),
        "max_keys": Field(Int(min=1), 100000, "buckets kept (least recently used dropped)"),
    },
    check=_check,
)


# -- the middleware ------------------------------------------------------------


@implementer(IMiddleware)
class RateLimit:
    """
    The C{rate_limit} middleware; see the module docstring.

    @param context: a L{harmony.registry.BuildContext}; its C{reactor} is
        the clock, read at the first request (it is C{None} when only
        checking a configuration; then C{time.monotonic} is used).
    """

    def __init__(self, name, options, context=None):
        self.name = name
        self._context = context
        self._seconds = None
        burst = options.burst if options.burst is not None else max(1, math.ceil(options.rate))
        self.key = options.key
        self.buckets = TokenBuckets(options.rate, burst, options.max_keys)
        self._key_of = key_function(options.key)

    def _now(self):
        seconds = self._seconds
        if seconds is None:
            reactor = getattr(self._context, "reactor", None)
            seconds = self._seconds = reactor.seconds if reactor is not None else time.monotonic
        return seconds()

    def request(self, envelope):
        key, label = self._key_of(envelope)
        now = self._now()
        wait = self.buckets.take(key, now)
        if not wait:
            return None
        retry_after = retry_after_secs(wait)
        if self.buckets.should_log(key, now):
            log.info(
                "rate_limit {middleware}: {who} is over {rate:g} requests/s (burst {burst:g}); "
                "refusing with 429, retry after {retry_after}s (logged at most once a minute)",
                middleware=self.name,
                who=label,
                rate=self.buckets.rate,
                burst=self.buckets.burst,
                retry_after=retry_after,
            )
        raise TooManyRequests(retry_after)

    def response(self, envelope, response):
        return None


#: The C{rate_limit} middleware type (registered as a built-in; also
#: loadable as C{[middleware_types.rate_limit] module =
#: "harmony.middleware.rate_limit:MIDDLEWARE_TYPE"}).
MIDDLEWARE_TYPE = MiddlewareType("rate_limit", RateLimit, options=OPTIONS)
