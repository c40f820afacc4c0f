"""DICOM result objects (SR, Secondary Capture) made from Findings. No network."""
