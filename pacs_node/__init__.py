"""igtv-node's DICOM service: CLI, config, listeners, spool, jobs, workers, export."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("igtv-node")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0"
