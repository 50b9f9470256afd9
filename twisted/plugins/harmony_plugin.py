# twistd plugin: `twistd harmony -c config.toml`. Lazy: harmony.tap is imported only when used.
from twisted.application.service import ServiceMaker

harmony = ServiceMaker(
    "Harmony",
    "harmony.tap",
    "Healthcare protocol gateway (HTTP, FHIR, DICOMweb, JMIX, DICOM).",
    "harmony",
)
