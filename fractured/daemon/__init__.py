"""The node: DICOM networking and the durable study queue."""
