"""What a backbone-weights file is (its format name and version) and the errors about weights sources:
shared by ``model.weights`` (loading, the CLI) and ``model.weights_hed`` (the HED conversion), which
import this module rather than each other."""

from __future__ import annotations

from model.errors import UserError

FORMAT = "refinedet-backbone-weights"
FORMAT_VERSION = 1


class WeightsError(UserError, ValueError):
    """A weights source that cannot be used; the message says why (the CLI prints it, no traceback)."""


class WeightsFormatError(WeightsError):
    """The file exists but is not what it should be (wrong format, layers or shapes)."""
