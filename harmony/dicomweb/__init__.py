"""DICOMweb (PS3.18): DICOM JSON/XML, multipart/related and Accept negotiation."""
