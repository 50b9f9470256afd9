# -*- test-case-name: tests.unit.test_logs -*-
"""
Harmony's logging: structured C{twisted.logger} events, filtered by the
configured level (C{[logging] level}, alias C{[proxy] log_level}),
written as text or JSON lines (C{[logging] format}) to stdout (journald)
and optionally to a file.

Modules get their logger from L{logger}; events go through one filtering
observer into the global log publisher (twistd's log, journald).  Never
pass bodies, datasets, identifiers or query strings to a log event.

Access log: one event per HTTP request (L{http_access}) and per DICOM
association (L{dicom_access}) in the C{harmony.access} namespace, at
C{info}, written whatever the level (like a web server's access log,
it is a separate stream: C{[logging] access_log = false} turns it off).

JSON lines: one object per event with C{timestamp} (ISO-8601 UTC,
milliseconds), C{level}, C{namespace}, C{message} (the formatted text),
C{error_type} and C{traceback} for failures, and the event's structured
fields whose keys are in L{SAFE_FIELDS} and whose values are plain
(string, number, boolean, null, or a table of those): fields a module
passes but does not put in its message never leak through JSON.  In
the worker processes other than the first (C{[proxy] workers}), every
JSON line also has C{worker} (its index, L{set_worker}).
"""

import atexit
import json
import os
import sys
import time

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
)
from zope.interface import implementer

LEVELS = {
    "trace": LogLevel.debug,
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}

FORMATS = ("text", "json")

#: The namespace of access events.
ACCESS = "harmony.access"

#: Structured fields copied into JSON lines (besides timestamp, level,
#: namespace, message): operational names, addresses, counts and times,
#: never content.
SAFE_FIELDS = frozenset(
    {
        # access events
        "access",
        "method",
        "path",
        "status",
        "bytes",
        "duration_ms",
        "client",
        "network",
        "pipeline",
        "request_id",
        "aborted",
        "calling_aet",
        "called_aet",
        "peer",
        "operations",
        "result",
        # other events
        "endpoint",
        "backend",
        "middleware",
        "target",
        "host",
        "port",
        "calling",
        "called",
        "accepted",
        "proposed",
        "source",
        "reason",
        "kind",
        "secs",
        "count",
        "state",
        "version",
        "pipelines",
    }
)

_PLAIN = (str, int, float, bool, type(None))
_SCALARS = frozenset(_PLAIN)

#: The key of an event's message formatted by the emitter (access events:
#: cheaper than twisted's format strings on the hot path).
TEXT = "harmony_text"

_encode = json.JSONEncoder(default=str).encode
_json_string = json.encoder.encode_basestring_ascii

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_predicate.setLogLevelForNamespace(ACCESS, LogLevel.info)


def logger(namespace):
    """
    A C{Logger} whose events honour the configured level.
    """
    return Logger(namespace=namespace, observer=_observer)


def set_level(name):
    """
    Apply a C{log_level} value (C{trace|debug|info|warn|error}).  Access
    events keep their own switch (L{set_access}).
    """
    _predicate.setLogLevelForNamespace("", LEVELS[name])


def level():
    return _predicate.logLevelForNamespace("")


# -- formats ---------------------------------------------------------------

_utc_cache = [None, ""]
_local_cache = [None, ""]


def iso_utc(when):
    """
    C{2024-05-01T12:00:00.123Z} for a POSIX timestamp (the part up to the
    seconds is formatted once per second).
    """
    if when is None:
        when = time.time()
    second = int(when)
    if _utc_cache[0] != second:
        _utc_cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _utc_cache[0] = second
    return "%s.%03dZ" % (_utc_cache[1], int((when - second) * 1000))


def _local_time(when):
    """
    twistd's text timestamp (local time, RFC 3339 offset), formatted once
    per second.
    """
    if when is None:
        return "-"
    second = int(when)
    if _local_cache[0] != second:
        _local_cache[1] = formatTime(second)
        _local_cache[0] = second
    return _local_cache[1]


def format_text(event):
    """
    One event as twistd's classic text line (C{time [namespace#level]
    message}, failures followed by their traceback).
    """
    text = event.get(TEXT)
    if text is not None:
        # An access event: formatted already, no failure.
        level = event.get("log_level")
        return "%s [%s#%s] %s\n" % (
            _local_time(event.get("log_time")),
            event.get("log_namespace", "-"),
            level.name if level is not None else "-",
            text,
        )
    return formatEventAsClassicLogText(event, formatTime=_local_time)


def _plain(value):
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, dict):
        return all(isinstance(k, str) and isinstance(v, _PLAIN) for k, v in value.items())
    return False


def _http_access_json(event, s=_json_string):
    """
    L{format_json} of an HTTP access event, written directly (once per
    request: the general path costs several times more).
    """
    return (
        '{"timestamp": "%s", "level": "info", "namespace": "harmony.access", "message": %s, "access": "http",'
        ' "method": %s, "path": %s, "status": %d, "bytes": %d, "duration_ms": %r, "client": %s, "network": %s,'
        ' "pipeline": %s, "request_id": %s, "aborted": %s%s}\n'
        % (
            iso_utc(event["log_time"]),
            s(event[TEXT]),
            s(event["method"]),
            s(event["path"]),
            event["status"],
            event["bytes"],
            float(event["duration_ms"]),
            s(event["client"]),
            s(event["network"]),
            s(event["pipeline"]),
            s(event["request_id"]),
            "true" if event["aborted"] else "false",
            _worker_json[0],
        )
    )


def format_json(event):
    """
    One event as a JSON object on one line (see the module docstring).
    """
    if event.get("access") == "http" and TEXT in event:
        try:
            return _http_access_json(event)
        except (KeyError, TypeError, ValueError):
            pass  # not what http_access makes: the general path
    level = event.get("log_level")
    out = {
        "timestamp": iso_utc(event.get("log_time")),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", "-"),
        "message": event.get(TEXT) or formatEvent(event),
    }
    for key, value in event.items():
        if key in SAFE_FIELDS and (type(value) in _SCALARS or _plain(value)):
            out[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        out["error_type"] = getattr(failure.type, "__name__", str(failure.type))
        try:
            out["traceback"] = failure.getTraceback()
        except Exception:
            out["traceback"] = "(no traceback)"
    if _worker[0] is not None:
        out["worker"] = _worker[0]
    return _encode(out) + "\n"


#: This process's worker index (None: the first process, or the only one),
#: and its JSON field as the HTTP access fast path appends it.
_worker = [None]
_worker_json = [""]


def set_worker(index):
    """
    Mark this process's JSON lines with C{"worker": index} (a worker
    process other than the first; C{None}: no mark).
    """
    _worker[0] = index
    _worker_json[0] = "" if index is None else ', "worker": %d' % index


_FORMATTERS = {"text": format_text, "json": format_json}
_format = ["text"]


def set_format(name):
    """
    Choose the format (C{text} or C{json}) of Harmony's observers
    (L{add_file}, L{twistd_observer}).
    """
    if name not in _FORMATTERS:
        raise ValueError(f"unknown log format {name!r}")
    _format[0] = name


def formatter(name=None):
    """
    The event formatter of a format (default: the current one).
    """
    return _FORMATTERS[name or _format[0]]


def _current(event):
    return _FORMATTERS[_format[0]](event)


def stream_observer(stream, name=None, clock=None):
    """
    An observer writing every event to C{stream}, one line (text: possibly
    several for a traceback) per event.

    @param name: a format; C{None}: the current one at each event (a
        reload that changes C{[logging] format} applies at once).
    @param clock: the reactor: lines are written in batches (see
        L{BatchingObserver}); C{None}: each line is written and flushed
        at once.
    """
    format_event = _current if name is None else formatter(name)
    if clock is None:
        return FileLogObserver(stream, format_event)
    return BatchingObserver(stream, format_event, clock)


@implementer(ILogObserver)
class BatchingObserver:
    """
    Writes formatted events to a stream in batches: one write and flush
    per reactor iteration (C{callLater(0)}) instead of one per event (a
    system call per access line is a measurable share of a proxied
    request), at once for warnings and errors, when C{limit} characters
    are waiting, and when the reactor is not running (startup, shutdown).
    The order of lines is kept.
    """

    limit = 64 * 1024

    def __init__(self, stream, format_event, clock):
        self._stream = stream
        self._format = format_event
        self._clock = clock
        self._parts = []
        self._size = 0
        self._call = None

    def __call__(self, event):
        text = self._format(event)
        if not text:
            return
        self._parts.append(text)
        self._size += len(text)
        level = event.get("log_level")
        if (
            self._size >= self.limit
            or (level is not None and level >= LogLevel.warn)
            or not getattr(self._clock, "running", True)
        ):
            self.flush()
        elif self._call is None:
            self._call = self._clock.callLater(0, self.flush)

    def flush(self):
        """
        Write what is waiting, now.
        """
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        if self._parts:
            text = "".join(self._parts)
            self._parts.clear()
            self._size = 0
            self._stream.write(text)
            self._stream.flush()


def twistd_observer(server_options=None, clock=None):
    """
    The observer that replaces twistd's default one, so that stdout
    (journald) or twistd's log file gets the configured format.  Same
    destination as twistd's: stdout with C{-n} (or C{--logfile=-}), else
    the C{--logfile} (default C{twistd.log}), opened the way twistd
    does (no rotation on SIGUSR1).  With C{--syslog}: C{None} (keep
    twistd's own observer).

    @param server_options: twistd's C{ServerOptions} (C{options.parent}
        in C{makeService}), or C{None} for stdout.
    @param clock: the reactor, for writing in batches (L{BatchingObserver}).
    """
    options = server_options if server_options is not None else {"nodaemon": True}
    if options.get("syslog"):
        return None
    path = options.get("logfile") or ""
    if path == "-" or (not path and options.get("nodaemon")):
        stream = sys.stdout
    else:
        from twisted.python.logfile import LogFile

        stream = LogFile.fromFullPath(path or "twistd.log")
    observer = stream_observer(stream, clock=clock)
    if clock is not None:
        # Lines still waiting when the process ends are written.
        atexit.register(observer.flush)
    return observer


# -- access log -------------------------------------------------------------

_access_log = Logger(namespace=ACCESS)
_access = [True]


def _emit_access(event):
    """
    Publish an access event: what C{Logger.emit} does, without its checks
    and without the level filter (access events are always C{info} and
    not subject to the level): this runs once per request.
    """
    event["log_logger"] = _access_log
    event["log_level"] = LogLevel.info
    event["log_namespace"] = ACCESS
    event["log_source"] = None
    event["log_time"] = time.time()
    _tee(event)

_HTTP_FORMAT = (
    "{method} {path} {status} {bytes}B {duration_ms}ms client={client} "
    "network={network} pipeline={pipeline} request_id={request_id}"
)
_HTTP_ABORTED_FORMAT = _HTTP_FORMAT + " (connection lost)"
_DICOM_FORMAT = (
    "DICOM association {calling_aet} -> {called_aet} from {peer} {result} after {duration_ms}ms,"
    " operations {operations_text}"
)


def set_access(enabled):
    """
    Turn the access log (C{[logging] access_log}) on or off.
    """
    _access[0] = bool(enabled)


def access_enabled():
    return _access[0]


def _printable(text):
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def http_access(method, path, status, length, duration, client, network, pipeline, request_id, aborted=False):
    """
    The access event of one HTTP request.

    @param path: the path B{without} the query string (never log those:
        they can hold patient identifiers).
    @param length: response body bytes sent.
    @param duration: seconds from the request line to the last byte.
    @param aborted: the connection was lost before the response was
        complete (C{status} 499 when no status was sent).
    """
    if not _access[0]:
        return
    if not path.isprintable():
        path = _printable(path)
    duration_ms = int(duration * 1000000) / 1000 if duration > 0 else 0.0
    client = client or "-"
    network = network or "-"
    pipeline = pipeline or "-"
    request_id = request_id or "-"
    text = "%s %s %s %sB %sms client=%s network=%s pipeline=%s request_id=%s" % (
        method, path, status, length, duration_ms, client, network, pipeline, request_id
    )
    _emit_access(
        {
            "log_format": _HTTP_ABORTED_FORMAT if aborted else _HTTP_FORMAT,
            TEXT: text + " (connection lost)" if aborted else text,
            "access": "http",
            "method": method,
            "path": path,
            "status": status,
            "bytes": length,
            "duration_ms": duration_ms,
            "client": client,
            "network": network,
            "pipeline": pipeline,
            "request_id": request_id,
            "aborted": aborted,
        }
    )


def dicom_access(calling_aet, called_aet, peer, duration, operations, result):
    """
    The access event of one DICOM association, at its end.

    @param operations: operation name (C{echo}, C{store}, ...) -> count of
        requests received.
    @param result: C{released}, C{aborted} or C{rejected}.
    """
    if not _access[0]:
        return
    operations_text = ", ".join(f"{k}={v}" for k, v in sorted(operations.items())) or "none"
    duration_ms = round(duration * 1000, 3)
    _emit_access(
        {
            "log_format": _DICOM_FORMAT,
            TEXT: (
                f"DICOM association {calling_aet} -> {called_aet} from {peer} {result} after {duration_ms}ms,"
                f" operations {operations_text}"
            ),
            "access": "dicom",
            "calling_aet": calling_aet,
            "called_aet": called_aet,
            "peer": peer,
            "duration_ms": duration_ms,
            "operations": dict(operations),
            "operations_text": operations_text,
            "result": result,
        }
    )


def configure(options):
    """
    Apply a validated C{[logging]} table (at startup and on reload): level,
    format, access log.
    """
    set_level(options.level)
    set_format(options.format)
    set_access(options.access_log)


# -- files ------------------------------------------------------------------


def add_file(path):
    """
    Also write Harmony's events (at the configured level) to C{path}
    (appended; the directory is created), in the current format.

    @return: the observer, for L{remove_file}.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    f = open(path, "a", encoding="utf-8")
    observer = FilteringLogObserver(stream_observer(f), [_predicate])
    observer._harmony_file = f
    _file_observers.append(observer)
    return observer


def remove_file(observer):
    _file_observers.remove(observer)
    observer._harmony_file.close()


_file_observers = []


class _Tee:
    """
    Sends an event to the log files, then to the global publisher (looked
    up at call time: tests swap observers on it).
    """

    def __call__(self, event):
        if _file_observers:
            for observer in tuple(_file_observers):
                observer(event)
        globalLogPublisher(event)


_tee = _Tee()
_observer = FilteringLogObserver(_tee, [_predicate])
_access_log.observer = _observer
