"""igtv-node's DICOM service: CLI, config, listeners, spool, jobs, workers, export."""

from pipeline.version import __version__

__all__ = ["__version__"]
