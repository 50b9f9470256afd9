# -*- test-case-name: tests.unit.test_logs -*-
"""
Harmony's logging: structured C{twisted.logger} events, filtered by the
configured C{[proxy] log_level}, optionally also written to a file.

Modules get their logger from L{logger}; events go through one filtering
observer into the global log publisher (twistd's log, journald).  Never
pass bodies, datasets, identifiers or query strings to a log event.
"""

import os

from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
    textFileLogObserver,
)

LEVELS = {
    "trace": LogLevel.debug,
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)


def logger(namespace):
    """
    A C{Logger} whose events honour the configured level.
    """
    return Logger(namespace=namespace, observer=_observer)


def set_level(name):
    """
    Apply a C{log_level} value (C{trace|debug|info|warn|error}).
    """
    _predicate.setLogLevelForNamespace("", LEVELS[name])


def level():
    return _predicate.logLevelForNamespace("")


def add_file(path):
    """
    Also write Harmony's events (at the configured level) to C{path}
    (appended; the directory is created).

    @return: the observer, for L{remove_file}.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    f = open(path, "a", encoding="utf-8")
    observer = FilteringLogObserver(textFileLogObserver(f), [_predicate])
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
        for observer in list(_file_observers):
            observer(event)
        globalLogPublisher(event)


_observer = FilteringLogObserver(_Tee(), [_predicate])
