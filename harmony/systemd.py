# -*- test-case-name: tests.integration.test_systemd -*-
"""
The systemd unit for Harmony (C{etc/systemd/harmony.service} is this
template with the default paths; C{harmony systemd-unit} renders it for
another venv, config or user), and the C{sd_notify} protocol (C{Type=notify}:
C{READY=1} once every listener is up, C{RELOADING=1} during a C{SIGHUP}
reload, C{STOPPING=1} when shutting down).
"""

import os
import socket
import time

DEFAULT_VENV = "/opt/harmony/venv"
DEFAULT_CONFIG = "/etc/harmony/harmony.toml"
DEFAULT_USER = "harmony"

UNIT = """\
# Harmony healthcare protocol gateway.
# Install: see README.md ("Running under systemd").
[Unit]
Description=Harmony healthcare protocol gateway
After=network-online.target
Wants=network-online.target

[Service]
# Type=notify: Harmony tells systemd READY=1 once every listener is up (a
# bad configuration makes twistd exit non-zero at once; Restart= then backs
# off), RELOADING=1 while SIGHUP reloads the configuration, STOPPING=1 while
# SIGTERM drains in-flight requests and associations.
Type=notify
NotifyAccess=main
User={user}
Group={user}
WorkingDirectory=/var/lib/harmony
ExecStartPre={venv}/bin/harmony check-config {config}
ExecStart={venv}/bin/twistd --nodaemon --pidfile= harmony -c {config}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=5
# Longer than [proxy] shutdown_grace_secs (default 20).
TimeoutStopSec=30
KillSignal=SIGTERM

# Logs go to stdout/stderr, i.e. the journal.
StandardOutput=journal
StandardError=journal
SyslogIdentifier=harmony

# Files Harmony may write (storage, temp areas, optional log file).
StateDirectory=harmony
LogsDirectory=harmony
# [proxy] workers > 1: the directory the worker processes share.
RuntimeDirectory=harmony
UMask=0027

# Bind DICOM port 104 or HTTP ports below 1024 without running as root.
AmbientCapabilities=CAP_NET_BIND_SERVICE
CapabilityBoundingSet=CAP_NET_BIND_SERVICE

# Hardening.
NoNewPrivileges=true
ProtectSystem=strict
ProtectHome=true
PrivateTmp=true
PrivateDevices=true
ProtectKernelTunables=true
ProtectKernelModules=true
ProtectKernelLogs=true
ProtectControlGroups=true
ProtectClock=true
ProtectHostname=true
ProtectProc=invisible
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=true
RestrictRealtime=true
RestrictSUIDSGID=true
LockPersonality=true
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources

[Install]
WantedBy=multi-user.target
"""


def render_unit(venv=DEFAULT_VENV, config=DEFAULT_CONFIG, user=DEFAULT_USER):
    """
    The unit text for a venv, a configuration file and a service user.
    """
    return UNIT.format(venv=venv.rstrip("/"), config=config, user=user)


def notify(state, environ=None):
    """
    Send C{state} (e.g. C{"READY=1"}) to systemd's notification socket
    (C{$NOTIFY_SOCKET}; an abstract socket when it starts with C{@}).
    Nothing happens outside systemd; errors are swallowed (a missing
    notification must not stop the gateway).

    @return: C{True} when the message was sent.
    """
    environ = os.environ if environ is None else environ
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError:
        return False
    return True


def monotonic_usec():
    """
    C{CLOCK_MONOTONIC} in microseconds (C{MONOTONIC_USEC=} of a
    C{RELOADING=1} notification).
    """
    return int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000)
