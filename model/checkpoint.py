"""Self-describing checkpoints, written atomically.

A checkpoint is one ``torch.save`` dict: ``format`` / ``format_version``, the full model ``config``
(class names, input size, normalisation, anchors, thresholds), the ``state_dict`` (optionally stored
as float16) and free-form ``metadata`` (provenance, training summary). The trainer adds a ``training``
entry (optimizer, scheduler, iteration, RNG states) that ``load_model`` ignores.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from model.config import RefineDetConfig
from model.errors import UserError
from model.network import RefineDet, build_model

FORMAT = "refinedet-checkpoint"
XZ_MAGIC = b"\xfd7zXZ\x00"  # the first bytes of an xz stream (the shipped checkpoint is compressed)
FORMAT_VERSION = 1
# What a file that is not a checkpoint often is, by its first bytes (a checkpoint is a zip or a pickle).
FILE_SIGNATURES = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"RIFF", "a RIFF file (WebP image?)"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
    (b"%PDF", "a PDF document"),
)


class CheckpointError(UserError, ValueError):
    """A file that is missing, unreadable or not a RefineDet checkpoint."""


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file via a temporary sibling, fsync and ``os.replace``: readers see the old file or the
    complete new one, never a partial write (a crash leaves at most a stray ``.tmp`` file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_dict(
    model: RefineDet, metadata: dict[str, Any] | None = None, half: bool = False
) -> dict[str, Any]:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "state_dict": state,
        "metadata": dict(metadata or {}),
    }


def save_checkpoint(
    path: str | Path,
    model: RefineDet,
    metadata: dict[str, Any] | None = None,
    half: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` with its config; ``extra`` entries (e.g. ``training``) are stored alongside."""
    ckpt = checkpoint_dict(unwrap(model), metadata, half)
    ckpt.update(extra or {})
    return atomic_torch_save(ckpt, path)


def stored_bytes(path: Path) -> io.BytesIO:
    """A saved file's bytes for ``torch.load``, decompressed when they are xz data (the shipped default
    is stored xz-compressed, see model/zoo.py). Raises OSError or ``lzma.LZMAError``."""
    data = path.read_bytes()
    return io.BytesIO(lzma.decompress(data) if data.startswith(XZ_MAGIC) else data)


def load_failure(path: Path, exc: BaseException) -> str:
    """Why ``torch.load`` could not read ``path``, in a few words on one line: what the file is when its
    first bytes say so (an image, ...), else the error's first line (never PyTorch's multi-line advice on
    ``weights_only``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        head = b""
    for signature, kind in FILE_SIGNATURES:
        if head.startswith(signature):
            return f"it is {kind}"
    if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "it is a text file"
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # weights_only=True: the cause follows PyTorch's advice
        text = text.split("WeightsUnpickler error:", 1)[1]
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    line = line.split(". ", 1)[0].removesuffix(".")[:200]  # the first sentence: what, not PyTorch's advice
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate the raw checkpoint dict; clear errors for wrong or damaged files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(stored_bytes(path), map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise CheckpointError(f"{path} is not a checkpoint ({load_failure(path, exc)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a RefineDet checkpoint (no '{FORMAT}' format marker)")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {ckpt['format_version']}; this version reads up to {FORMAT_VERSION}"
        )
    return ckpt


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[RefineDet, dict[str, Any]]:
    """Rebuild the model from the file alone. Returns (model in eval mode, float32; raw checkpoint)."""
    ckpt = read_checkpoint(path, map_location)
    config = RefineDetConfig.from_dict(ckpt["config"])
    model = build_model(config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit the config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model.to(map_location).eval(), ckpt


def unwrap(model: torch.nn.Module) -> RefineDet:
    """The RefineDet inside DDP / torch.compile wrappers."""
    inner: object = model
    while hasattr(inner, "module") or hasattr(inner, "_orig_mod"):
        inner = getattr(inner, "module", None) or getattr(inner, "_orig_mod")  # noqa: B009
    if not isinstance(inner, RefineDet):
        raise TypeError(f"expected a RefineDet (possibly wrapped), got {type(inner).__name__}")
    return inner
