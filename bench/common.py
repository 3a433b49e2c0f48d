"""What both benchmarks share: the model to measure, the real photos to send, tables and JSON output.

The model defaults to the shipped checkpoint (``model.zoo``); without one, a random-weight RefineDet320
VGG-16 with the BCCD classes is saved to a temporary checkpoint (its numbers are labelled ``untrained``).
Photos default to the BCCD JPEGs (640x480), found like the tests find the dataset.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from model.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
JPEG_SUFFIXES = (".jpg", ".jpeg")


def parse_list(text: str, cast: type = str) -> list:
    """ "1,8,32" -> [1, 8, 32] (``cast`` each item); empty items are ignored."""
    try:
        return [cast(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UserError(f"expected a comma-separated list of {cast.__name__}, got {text!r}") from None


def bccd_jpeg_dir() -> Path | None:
    """BCCD's JPEGImages: env REFINEDET_BCCD, else data/BCCD in the repo, else ../shared/data/BCCD."""
    candidates = [
        os.environ.get("REFINEDET_BCCD"),
        REPO_ROOT / "data" / "BCCD",
        REPO_ROOT.parent / "shared" / "data" / "BCCD",
    ]
    for c in candidates:
        if c and (Path(c) / "JPEGImages").is_dir():
            return Path(c) / "JPEGImages"
    return None


def find_jpegs(sources: Sequence[str] = (), limit: int = 64) -> list[Path]:
    """JPEG files from ``sources`` (files or folders), else the BCCD images; sorted, at most ``limit``."""
    roots = [Path(s) for s in sources] if sources else [d for d in [bccd_jpeg_dir()] if d]
    files: list[Path] = []
    for root in roots:
        if root.is_dir():
            files += sorted(p for p in root.iterdir() if p.suffix.lower() in JPEG_SUFFIXES)
        elif root.is_file():
            files.append(root)
        else:
            raise UserError(f"--images: {root} is neither a file nor a folder")
    if not files:
        where = (
            ", ".join(sources) if sources else "the BCCD dataset (set REFINEDET_BCCD or put it at data/BCCD)"
        )
        raise UserError(f"no JPEG images found in {where}")
    return files[:limit]


def read_jpegs(paths: Iterable[Path]) -> list[bytes]:
    return [p.read_bytes() for p in paths]


def resolve_checkpoint(checkpoint: str | None, workdir: Path) -> Path:
    """The checkpoint given, else the shipped default, else random BCCD weights saved in ``workdir``."""
    from model.zoo import default_checkpoint

    if checkpoint:
        if not Path(checkpoint).is_file():
            raise UserError(f"--checkpoint {checkpoint} not found")
        return Path(checkpoint)
    shipped = default_checkpoint()
    if shipped is not None:
        return shipped
    print("bench: no trained default checkpoint; using RANDOM weights (BCCD classes)", file=sys.stderr)
    return random_checkpoint(workdir / "untrained.pth")


def random_checkpoint(path: Path) -> Path:
    """A random-weight RefineDet320 VGG-16 with the BCCD classes, saved as a checkpoint."""
    import torch

    from model.checkpoint import save_checkpoint
    from model.config import preset
    from model.network import build_model
    from model.zoo import DEFAULT_CLASSES, DEFAULT_PRESET

    torch.manual_seed(0)
    model = build_model(preset(DEFAULT_PRESET, class_names=DEFAULT_CLASSES))
    return save_checkpoint(path, model, metadata={"trained": False})


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    from model.cpu import cpu_info

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_info": cpu_info().to_dict(),  # model name, ISA flags (avx512, vnni, amx), usable cores
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Atomic JSON write (readers never see a partial file)."""
    from model.artifacts import atomic_write_bytes

    return atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Plain-text table: ``columns`` are (key, header); None/missing cells print as '-'."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    body = [[cell(row.get(key)) for key, _ in columns] for row in rows]
    headers = [h for _, h in columns]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    rule = "  ".join("-" * w for w in widths)
    rows_text = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join([line, rule, *rows_text])


def service_backend(settings: Any) -> tuple[Any, Any]:
    """(backend, plan): the engine plan ``refinedet serve`` would serve for ``settings`` (``deploy.prepare``,
    the one decision) and its backend, unloaded, as the service builds it."""
    from deploy.prepare import prepare
    from service.backends import create_backend

    plan = prepare(settings)
    return create_backend(plan, settings), plan
