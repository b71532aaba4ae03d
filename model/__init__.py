"""SIM-Mamba IGTV network, selective scan, training and checkpoints (torch only, no DICOM)."""
