"""The project's version, for every layer that reports it (``refinedet --version``, the service's OpenAPI
document and ``/v2``)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

UNKNOWN = "unknown"  # run from a source tree that was never installed: no version to report


def package_version() -> str:
    """The installed distribution's version (pyproject.toml's), ``UNKNOWN`` when it is not installed."""
    try:
        return version("refinedet")
    except PackageNotFoundError:
        return UNKNOWN
