"""
Harmony's storage: the only code that writes files (DESIGN.md "Storage").

  - L{IStorage} / L{IStorageWriter} (L{harmony.storage.interfaces}): atomic
    write-from-stream (temp + rename), chunk-by-chunk writers for the
    C-STORE SCP, lazy reads as L{harmony.streams.Stream}, listing, deletes,
    temp areas, optional fsync; results are L{StoredObject}s.
  - L{FilesystemStorage} (L{harmony.storage.filesystem}): the local
    directory implementation, also the service owning the thread pool that
    fsyncs, lists and deletes.
  - L{harmony.storage.dicom}: the minimal tag walk for the Study/Series/SOP
    Instance UIDs, the C{{study}/{series}/{sop}.dcm} layout and the Part 10
    file meta fast path.
"""

from harmony.storage.dicom import (
    DEFAULT_LAYOUT,
    NeedMoreData,
    check_layout,
    file_meta,
    layout_path,
    uids_from_dataset_prefix,
)
from harmony.storage.filesystem import FilesystemStorage, FileWriter
from harmony.storage.interfaces import IStorage, IStorageWriter, StoredObject

__all__ = [
    "DEFAULT_LAYOUT",
    "FileWriter",
    "FilesystemStorage",
    "IStorage",
    "IStorageWriter",
    "NeedMoreData",
    "StoredObject",
    "check_layout",
    "file_meta",
    "layout_path",
    "uids_from_dataset_prefix",
]
