"""DICOM in -> arrays -> DICOM out: pure functions, no sockets or threads."""
