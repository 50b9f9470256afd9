# -*- test-case-name: tests.integration.test_systemd -*-
"""
The systemd unit for Harmony (C{etc/systemd/harmony.service} is this
template with the default paths; C{harmony systemd-unit} renders it for
another venv, config or user).
"""

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
# Type=simple: twistd has no sd_notify support yet; systemd considers the
# service started once the process runs, and a bad configuration makes
# twistd exit non-zero at once (Restart= then backs off).
Type=simple
User={user}
Group={user}
WorkingDirectory=/var/lib/harmony
ExecStartPre={venv}/bin/harmony check-config {config}
ExecStart={venv}/bin/twistd --nodaemon --pidfile= harmony -c {config}
Restart=on-failure
RestartSec=5
TimeoutStopSec=30
KillSignal=SIGTERM

# Logs go to stdout/stderr, i.e. the journal.
StandardOutput=journal
StandardError=journal
SyslogIdentifier=harmony

# Files Harmony may write (storage, temp areas, optional log file).
StateDirectory=harmony
LogsDirectory=harmony
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
