"""The installed igtv-node version (one place for every layer that writes it)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("igtv-node")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0"
