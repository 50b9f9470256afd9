"""
glibc malloc settings for a process that moves bulk data.

Harmony reads its sockets up to 1 MiB at a time (Twisted's C{recv} into a
new bytes object, shrunk to what came) and holds DICOM data sets of
hundreds of KiB while relaying or packaging them.  With glibc's defaults,
every block of 128 KiB or more is a fresh C{mmap(2)} whose pages the kernel
faults in and zeroes, and takes back at C{free}: glibc raises that limit by
itself only up to the size of the blocks freed, and C{recv}'s buffers are
freed after being shrunk, so it never does.  A JMIX build of a 100 MiB
study took 7,000-28,000 page faults that way (900-5,000 with the settings
below) and 5-20% more CPU (A/B runs, bench/README.md, C{jmix.py}).

L{tune} sets C{M_MMAP_THRESHOLD} to L{MMAP_THRESHOLD} (smaller blocks come
from the heap and are reused) and C{M_TRIM_THRESHOLD} to L{TRIM_THRESHOLD}
(up to that much freed heap is kept for the next blocks instead of being
handed back to the kernel at once).  It does nothing on a C library other
than glibc, or when the environment already sets malloc options
(C{MALLOC_MMAP_THRESHOLD_}, C{MALLOC_TRIM_THRESHOLD_}, or C{glibc.malloc}
tunables in C{GLIBC_TUNABLES}): an operator's choice wins.
"""

import ctypes
import os

from harmony.logs import logger

log = logger("harmony.allocator")

#: mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 32 * 1024 * 1024

_OVERRIDES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _glibc():
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
    except (ValueError, OSError):
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def tune(libc=None, environ=None):
    """
    Set glibc's malloc thresholds for this process (see the module
    docstring), once at startup.

    @param libc: the C library (a C{ctypes} library with C{mallopt}); the
        process's own glibc when C{None}.
    @param environ: the environment (default C{os.environ}).
    @return: C{True} when both were set.
    """
    environ = os.environ if environ is None else environ
    if any(name in environ for name in _OVERRIDES) or "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = _glibc() if libc is None else libc
    if libc is None:
        return False
    done = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not done:
        log.warn("glibc's malloc thresholds could not be set: more page faults for bulk transfers")
    return done
