"""
The FHIR imaging facade: FHIR R4 C{ImagingStudy} and C{Patient} answered
from a DICOM PACS by C-FIND.

  - L{harmony.fhir_imaging.params}: FHIR search parameters -> C-FIND
    identifiers (matching keys) and the exact post-filters applied to the
    matches;
  - L{harmony.fhir_imaging.resources}: C-FIND matches -> C{ImagingStudy},
    C{Patient}, C{Bundle} and C{CapabilityStatement} resources (dicts), and
    the Patient FHIR id encoding;
  - L{harmony.middleware.fhir_imaging}: the C{fhir_imaging} middleware that
    runs the C-FINDs through its pipeline's backends and answers.

The whole mapping is documented in L{harmony.middleware.fhir_imaging} and
in README.md ("FHIR imaging facade").
"""
