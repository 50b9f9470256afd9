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

Refusals are logged at most once a minute per key (per worker process),
naming the kind of key and, for client addresses and AE titles, the value
(never a JWT subject, header or metadata value: they may identify a
patient).

With several worker processes (C{[proxy] workers}, L{harmony.workers}),
the buckets are shared by the workers: L{SharedTokenBuckets}, a table of
slots in a file of the workers' shared directory mapped into each of them,
C{ratelimit-<middleware>.<pipeline>.bin} (each pipeline has its own buckets,
as in one process).  Its clock is C{time.monotonic} (C{CLOCK_MONOTONIC}:
one clock for every process of the machine, not moved by wall clock
steps), not the reactor's.  It holds a power of two of slots, at least 4/3
of C{max_keys}; a key lives in one of the 16 slots from its hash on, and a
new key, when those are taken, replaces the one of them used least
recently.  Keys are stored as 64-bit BLAKE2b hashes (two keys with one hash
would share a bucket: at 100000 keys, a chance below 1 in 10^9).

L{TokenBuckets} and L{SharedTokenBuckets} are the clock-free cores.
"""

import fcntl
import hashlib
import math
import mmap
import os
import re
import struct
import time
from collections import OrderedDict

from zope.interface import implementer

from harmony.config.schema import Field, Int, Number, Schema, Str
from harmony.errors import TooManyRequests
from harmony.interfaces import IMiddleware
from harmony.logs import logger
from harmony.registry import MiddlewareType
from harmony.workers import shared_dir

log = logger("harmony.middleware.rate_limit")

#: Metadata key of the verified JWT subject (set by C{jwt_auth}).
METADATA_JWT_SUB = "jwt.sub"

#: Key kinds without an argument.
SIMPLE_KEYS = ("client_ip", "jwt_subject", "global", "calling_aet")

#: A refusal is logged at most this often (seconds) per key.
LOG_INTERVAL_SECS = 60.0

#: Float slack when comparing token counts (refills add up fractions).
_EPSILON = 1e-9

#: A shared bucket whose time is ahead of the caller's by more than this
#: was written by another clock (the table outlived a reboot): its refill
#: starts again from the caller's time.
CLOCK_RESET_SECS = 1.0

_FILE_PART = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


# -- the core ------------------------------------------------------------------


def _check_buckets(rate, burst, max_keys):
    """
    The arguments L{TokenBuckets} and L{SharedTokenBuckets} take.

    @raise ValueError: one is out of range.
    """
    if rate <= 0:
        raise ValueError("rate must be > 0")
    if burst < 1:
        raise ValueError("burst must be >= 1")
    if max_keys < 1:
        raise ValueError("max_keys must be >= 1")


class TokenBuckets:
    """
    Token buckets by key, at most C{max_keys} of them (least recently used
    dropped first); no clock of its own: callers pass the time.

    @param rate: tokens added per second (> 0).
    @param burst: bucket size (>= 1).
    @param max_keys: buckets kept (>= 1).
    """

    def __init__(self, rate, burst, max_keys):
        _check_buckets(rate, burst, max_keys)
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


class SharedTokenBuckets:
    """
    Token buckets by key in a file mapped into every worker process: the
    same semantics and interface as L{TokenBuckets} (but C{max_keys} is
    approximate: see the module docstring), for buckets the workers share.

    File layout (native byte order; the processes are on one machine): a
    64-byte header, C{magic (4s), version (I), slot count (Q)}, then the
    slots, C{key hash (Q; 0: empty), tokens (d), last refill time (d)}.
    Every take holds an exclusive C{flock} of the file (a few microseconds;
    a look without taking, a shared one).  The file is created and sized
    under the exclusive lock: a new (or foreign) file is given its size and
    header, an existing table keeps its slot count (a new C{max_keys}
    applies with a new shared directory, i.e. after a restart).
    Times are whatever clock the caller passes, which must be one for all
    the processes (C{time.monotonic}); a time stored ahead of C{now} by more
    than L{CLOCK_RESET_SECS} (a table kept across a reboot) restarts that
    bucket's refill from C{now}.  The file is opened by L{open}, or when
    first used; it is closed by L{close} or when the object is collected.

    @param path: the table's file (created when missing).
    @param rate: tokens added per second (> 0).
    @param burst: bucket size (>= 1).
    @param max_keys: buckets to hold (>= 1).
    """

    MAGIC = b"HRLB"
    VERSION = 1
    HEADER_SIZE = 64
    #: Slots a key may live in, from its hash on.
    PROBE = 16
    _HEADER = struct.Struct("=4sIQ")
    _SLOT = struct.Struct("=Qdd")

    def __init__(self, path, rate, burst, max_keys):
        _check_buckets(rate, burst, max_keys)
        self.path = os.fspath(path)
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_keys = max_keys
        self.slots = None
        self._file = None
        self._fd = None
        self._map = None
        # key -> last time a refusal was logged (this process only)
        self._logged = OrderedDict()

    @classmethod
    def slots_for(cls, max_keys):
        """
        The slot count of a new table: a power of two, at least 4/3 of
        C{max_keys} (and at least L{PROBE}).
        """
        wanted = max(cls.PROBE, -(-max_keys * 4 // 3))
        return 1 << (wanted - 1).bit_length()

    def open(self):
        """
        Open (creating it when missing) and map the table, if not done yet.

        @raise OSError: it cannot be.
        """
        if self._map is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                slots = self._existing_slots(fd)
                if slots is None:
                    # New (or not a table): sized and headed under the
                    # lock, so processes starting together agree.
                    slots = self.slots_for(self.max_keys)
                    os.ftruncate(fd, 0)
                    os.ftruncate(fd, self.HEADER_SIZE + slots * self._SLOT.size)
                    os.pwrite(fd, self._HEADER.pack(self.MAGIC, self.VERSION, slots), 0)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            # The file never shrinks once headed: the mapping stays valid.
            self._map = mmap.mmap(fd, self.HEADER_SIZE + slots * self._SLOT.size)
        except BaseException:
            os.close(fd)
            raise
        # A file object: the descriptor is closed with it if close() is not.
        self._file = open(fd, "r+b", buffering=0)
        self._fd = fd
        self.slots = slots
        self._mask = slots - 1
        self._probe = min(self.PROBE, slots)

    def _existing_slots(self, fd):
        size = os.fstat(fd).st_size
        if size < self.HEADER_SIZE:
            return None
        magic, version, slots = self._HEADER.unpack(os.pread(fd, self._HEADER.size, 0))
        if magic != self.MAGIC or version != self.VERSION or slots < 1 or slots & (slots - 1):
            return None
        if size < self.HEADER_SIZE + slots * self._SLOT.size:
            return None
        return slots

    def close(self):
        """
        Unmap and close the table (the file stays for the other processes).
        """
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = self._fd = None

    @staticmethod
    def key_hash(key):
        """
        The 64-bit hash a key is stored as (never 0: the empty slot).
        """
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(digest, "little") or 1

    def _find(self, h):
        """
        The slot offset of hash C{h} and whether it holds it: its own
        slot, else the first empty one of its window, else the window's
        least recently refilled (to be replaced).  Under the lock.
        """
        table, unpack, size, mask = self._map, self._SLOT.unpack_from, self._SLOT.size, self._mask
        first = h & mask
        victim, oldest = None, math.inf
        for i in range(self._probe):
            offset = self.HEADER_SIZE + ((first + i) & mask) * size
            slot_hash, _, last = unpack(table, offset)
            if slot_hash == h:
                return offset, True
            if slot_hash == 0:
                # Slots are never emptied: the key is not further on.
                return offset, False
            if last < oldest:
                victim, oldest = offset, last
        return victim, False

    def _refilled(self, tokens, last, now):
        """
        C{(tokens, last)} refilled up to C{now}.
        """
        elapsed = now - last
        if elapsed > 0:
            return min(self.burst, tokens + elapsed * self.rate), now
        if elapsed < -CLOCK_RESET_SECS:
            return min(self.burst, tokens), now
        return min(self.burst, tokens), last

    def __len__(self):
        self.open()
        fd, table, unpack, size = self._fd, self._map, self._SLOT.unpack_from, self._SLOT.size
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            return sum(1 for i in range(self.slots) if unpack(table, self.HEADER_SIZE + i * size)[0])
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def __contains__(self, key):
        self.open()
        fd = self._fd
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            return self._find(self.key_hash(key))[1]
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def tokens(self, key, now):
        """
        The tokens C{key}'s bucket holds at C{now} (C{burst} for an unknown
        key), without taking one.
        """
        h = self.key_hash(key)
        if self._map is None:
            self.open()
        fd = self._fd
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            offset, found = self._find(h)
            if not found:
                return self.burst
            _, tokens, last = self._SLOT.unpack_from(self._map, offset)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return self._refilled(tokens, last, now)[0]

    def take(self, key, now):
        """
        Take a token from C{key}'s bucket.

        @param now: the time in seconds, on a clock shared by the processes.
        @return: C{0.0} when a token was taken, otherwise the seconds until
            one is available (> 0).
        """
        h = self.key_hash(key)
        if self._map is None:
            self.open()
        fd, table, slot = self._fd, self._map, self._SLOT
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            offset, found = self._find(h)
            if found:
                _, tokens, last = slot.unpack_from(table, offset)
                tokens, last = self._refilled(tokens, last, now)
            else:
                tokens, last = self.burst, now
            if tokens >= 1.0 - _EPSILON:
                slot.pack_into(table, offset, h, max(0.0, tokens - 1.0), last)
                return 0.0
            slot.pack_into(table, offset, h, tokens, last)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return (1.0 - tokens) / self.rate

    def should_log(self, key, now, interval=LOG_INTERVAL_SECS):
        """
        Whether a refusal for C{key} should be logged now by this process
        (at most once per C{interval} per key and process); records it
        when so.
        """
        logged = self._logged
        last = logged.get(key)
        if last is not None and now - last < interval:
            return False
        logged[key] = now
        logged.move_to_end(key)
        while len(logged) > self.max_keys:
            logged.popitem(last=False)
        return True


def table_path(directory, middleware, pipeline=None):
    """
    The file of a shared bucket table in C{directory}:
    C{ratelimit-<middleware>[.<pipeline>].bin}, each name as it is when
    made of letters, digits, C{_} and C{-} (at most 64), else a hash of it.
    """
    parts = [_file_part(middleware)]
    if pipeline is not None:
        parts.append(_file_part(pipeline))
    return os.path.join(directory, "ratelimit-" + ".".join(parts) + ".bin")


def _file_part(name):
    if _FILE_PART.match(name):
        return name
    return "h" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:24]


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
        checking a configuration; then C{time.monotonic} is used).  With
        several workers (L{harmony.workers.shared_dir} is set when it is
        built) the buckets are a L{SharedTokenBuckets} and the clock is
        C{time.monotonic}.
    """

    def __init__(self, name, options, context=None):
        self.name = name
        self._context = context
        self._seconds = None
        burst = options.burst if options.burst is not None else max(1, math.ceil(options.rate))
        self.key = options.key
        self._key_of = key_function(options.key)
        #: The workers' shared directory when there are several (read now,
        #: at build time), else C{None}.
        self.shared_dir = shared_dir()
        if self.shared_dir is None:
            self.buckets = TokenBuckets(options.rate, burst, options.max_keys)
        else:
            # Shared by the workers; opened when its pipeline is known
            # (bind_pipeline), or at the first request if never told.
            self.buckets = SharedTokenBuckets(
                table_path(self.shared_dir, name), options.rate, burst, options.max_keys
            )
            self._seconds = time.monotonic  # one clock for every process

    def bind_pipeline(self, executor):
        """
        With several workers: this instance's shared table is its
        pipeline's (a middleware in two pipelines has two sets of buckets,
        as in one process); opened now, so that a shared directory that
        cannot be written is a startup error.
        """
        if self.shared_dir is None:
            return
        buckets = self.buckets
        self.buckets = SharedTokenBuckets(
            table_path(self.shared_dir, self.name, executor.name), buckets.rate, buckets.burst, buckets.max_keys
        )
        buckets.close()
        self.buckets.open()

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
