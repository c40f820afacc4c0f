"""Pure inference: DICOM/pixels in, Findings out. No network, no database."""
