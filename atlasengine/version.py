"""The installed atlasengine's version, read from the package metadata (its one source: pyproject.toml)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("atlasengine")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
