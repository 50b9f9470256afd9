"""
DICOMweb (PS3.18) building blocks shared by the C{dicomweb} endpoint, the
C{dicomweb_bridge} middleware and the C{dicomweb} backend:

  - L{harmony.dicomweb.dicomjson}: DICOM JSON (Annex F) and Native DICOM
    Model XML (PS3.19), bulk data as C{BulkDataURI}s without loading it;
  - L{harmony.dicomweb.multipart}: C{multipart/related} written and parsed
    as streams (bounded memory);
  - L{harmony.dicomweb.accept}: C{Accept} negotiation per resource kind,
    transfer syntaxes included;
  - L{harmony.dicomweb.qido}: QIDO-RS query parameters -> C-FIND identifier;
  - L{harmony.dicomweb.pixels}: frames, rendered images and thumbnails.
"""
