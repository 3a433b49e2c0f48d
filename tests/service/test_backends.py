"""Backend choice and the backends themselves: torch (CPU here, CUDA marked gpu), ONNX Runtime over
an exported artifact (raw, decoded and fixed-batch graphs), TensorRT's clear refusal without a GPU."""

from __future__ import annotations

import pytest
import torch
from service_testing import (
    StandIn,
    app_for,
    assert_same_detections,
    encode,
    noise_image,
    plan_for,
    running,
    settings,
    tiny_config,
)

from model.artifacts import Manifest, write_manifest
from model.checkpoint import file_sha256
from model.errors import UserError
from model.network import OUTPUT_NAMES
from model.postprocess import PostProcessor
from model.runtime.plan import EnginePlan
from service.backends import create_backend, load_backend
from service.backends.base import batch_buckets, bucket_for, pad_batch
from service.detector import BatchDetector

CUDA = torch.cuda.is_available()


def touch(path):
    path.write_bytes(b"x")
    return path


def test_the_backend_is_built_as_the_plan_says(tmp_path):
    """The service builds what the plan names (deploy.prepare decided it) and re-derives nothing."""
    pytest.importorskip("onnxruntime")
    path, _ = export_standin(tmp_path)
    s = settings(model=path)
    backend = create_backend(plan_for(s, backend="onnxruntime").with_changes(max_batch=3, threads=1), s)
    assert (backend.name, backend.device.type, backend.max_batch, backend.cpu_threads) == (
        "onnxruntime",
        "cpu",
        3,
        1,
    )
    with pytest.raises(ValueError, match="unknown backend"):
        create_backend(plan_for(s).with_changes(backend="caffe"), s)


def built(s):
    """The backend for the plan of ``s.model`` as it is (``plan_for``), unloaded."""
    return create_backend(plan_for(s), s)


def test_batch_buckets_and_padding():
    assert batch_buckets(8) == [1, 2, 4, 8] and batch_buckets(6) == [1, 2, 4, 6] and batch_buckets(1) == [1]
    assert [bucket_for(b, [1, 2, 4, 8]) for b in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(ValueError):
        bucket_for(9, [1, 2, 4, 8])
    x = torch.ones(3, 2)
    padded = pad_batch(x, 4)
    assert padded.shape == (4, 2) and padded[:3].eq(1).all() and padded[3].eq(0).all()


def test_torch_backend_detector_matches_direct_postprocessing(tiny_backend, tiny_model):
    images = [torch.randint(0, 256, (3, 50 + 10 * i, 70), dtype=torch.uint8) for i in range(2)]
    results = BatchDetector(tiny_backend)(images)
    from model.preprocess import preprocess

    cfg = tiny_model.config
    with torch.inference_mode():
        for image, got in zip(images, results, strict=True):
            dets = PostProcessor(cfg)(
                tiny_model(preprocess([image], 64, cfg.normalization)), tiny_model.anchors
            )
            boxes, scores, labels = dets.image(0)
            assert torch.equal(got.labels, labels)
            torch.testing.assert_close(got.scores, scores, atol=1e-5, rtol=0)
            torch.testing.assert_close(got.boxes_xyxy, boxes, atol=1e-5, rtol=0)
    assert results[0].times.batch_size == 2 and results[0].times.inference_ms > 0


def export_standin(tmp_path, outputs="raw", batch=None):
    """A stand-in graph with RefineDet's I/O contract, exported to ONNX with its manifest."""
    torch.manual_seed(0)
    config = tiny_config()
    net = StandIn(config).eval()
    names = list(OUTPUT_NAMES) if outputs == "raw" else ["boxes_xyxy", "scores"]
    module = net if outputs == "raw" else DecodedStandIn(net, config)
    path = tmp_path / f"standin-{outputs}-{batch}.onnx"
    dynamic = None if batch else {n: {0: "batch"} for n in ["images", *names]}
    torch.onnx.export(module, (torch.zeros(batch or 2, 3, 64, 64),), str(path), dynamo=False, opset_version=17,
                      input_names=["images"], output_names=names, dynamic_axes=dynamic)  # fmt: skip
    write_manifest(path, Manifest("onnx", config, file_sha256(path), outputs=outputs, batch=batch))
    return path, net


class DecodedStandIn(torch.nn.Module):
    """decode_predictions inside the graph (an 'outputs: decoded' artifact)."""

    def __init__(self, net, config):
        super().__init__()
        from model.anchors import generate_anchors

        self.net, self.config = net, config
        self.register_buffer("anchors", generate_anchors(config))

    def forward(self, images):
        return PostProcessor(self.config).decode(self.net(images), self.anchors)


@pytest.mark.parametrize(("outputs", "batch"), [("raw", None), ("decoded", None), ("raw", 4)])
def test_onnxruntime_backend_equals_torch(tmp_path, outputs, batch):
    pytest.importorskip("onnxruntime")
    path, net = export_standin(tmp_path, outputs, batch)
    backend = built(settings(model=path, max_batch_size=8))
    backend.load()
    assert backend.name == "onnxruntime" and backend.precision == "fp32"
    assert backend.max_batch == (batch or 8) and backend.info.artifact_sha256 == file_sha256(path)
    images = [torch.randint(0, 256, (3, 40 + 8 * i, 64), dtype=torch.uint8) for i in range(3)]
    got = BatchDetector(backend)(images)
    from model.anchors import generate_anchors
    from model.preprocess import preprocess

    cfg = tiny_config()
    with torch.inference_mode():
        want = PostProcessor(cfg)(net(preprocess(images, 64, cfg.normalization)), generate_anchors(cfg))
    for i, g in enumerate(got):
        boxes, scores, labels = want.image(i)
        assert torch.equal(g.labels, labels)
        torch.testing.assert_close(g.scores, scores, atol=1e-5, rtol=0)
        torch.testing.assert_close(g.boxes_xyxy, boxes, atol=1e-5, rtol=0)


def test_onnx_model_served_over_http(tmp_path):
    pytest.importorskip("onnxruntime")
    path, _ = export_standin(tmp_path)
    with running(app_for(settings(model=path))) as c:
        info = c.get("/v1/model").json()
        assert (info["backend"], info["precision"], info["artifact_sha256"]) == (
            "onnxruntime",
            "fp32",
            file_sha256(path),
        )
        r = c.post("/detect", content=encode(noise_image(64, 48, 1)), headers={"content-type": "image/jpeg"})
        assert r.status_code == 200 and r.json()["model"]["backend"] == "onnxruntime"


def test_tensorrt_backend_without_tensorrt_is_a_clear_error(tmp_path):
    pytest.importorskip("onnxruntime")
    path, _ = export_standin(tmp_path)
    plan = tmp_path / "m.plan"
    plan.write_bytes(path.read_bytes())
    s = settings(model=plan)
    with pytest.raises(UserError):  # no TensorRT (or no GPU) here: a clear error, not a crash
        load_backend(EnginePlan(plan, "tensorrt", "cuda", "tensorrt-fp16", "fp16", 8, 1, None, "nvjpeg"), s)


@pytest.mark.slow
def test_exported_checkpoint_serves_like_the_checkpoint(tmp_path, tiny_checkpoint, client):
    """The real network through conversion's exporter, served by ONNX Runtime == served by torch."""
    pytest.importorskip("onnxruntime")
    from conversion.onnx_export import export_checkpoint

    onnx = export_checkpoint(tiny_checkpoint, tmp_path / "tiny.onnx") and tmp_path / "tiny.onnx"
    image = encode(noise_image(90, 70, 9))
    send = {"params": {"score_threshold": 0.3}, "content": image, "headers": {"content-type": "image/jpeg"}}
    want = client.post("/detect", **send).json()["detections"]
    with running(app_for(settings(model=onnx))) as c:
        got = c.post("/detect", **send).json()["detections"]
    ref = [{"label": d["label"], "score": d["score"], "box": list(d["box"].values())} for d in want]
    assert_same_detections(got, ref, box_tol=0.05, score_tol=1e-3)


@pytest.mark.gpu
def test_torch_cuda_fp16_graphs_match_cpu(tiny_checkpoint, tiny_backend):
    """FP16 + channels-last + CUDA graphs per bucket give the fp32 CPU network's outputs (to fp16
    precision), also for batches padded up to their bucket; eager fp16 and graph replay agree."""
    from model.preprocess import preprocess

    graphs = built(settings(model=tiny_checkpoint, device="cuda", max_batch_size=8, fuse_postprocess=False))
    eager = built(settings(model=tiny_checkpoint, device="cuda", max_batch_size=8, cuda_graphs=False))
    for backend in (graphs, eager):
        backend.load()
        backend.warmup(1)
    assert graphs.precision == "fp16" and sorted(graphs._graphs) == [1, 2, 4, 8] and not eager._graphs
    g = torch.Generator().manual_seed(0)
    for b in (1, 3, 8):  # 3 runs in the 4-image graph
        images = [torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8, generator=g) for _ in range(b)]
        x = preprocess(images, 64, tiny_backend.loaded_config.normalization)
        with torch.inference_mode():
            want = tiny_backend.infer(x)
            got, got_eager = graphs.infer(x.cuda()), eager.infer(x.cuda())
        for name, w, out, out_eager in zip(OUTPUT_NAMES, want, got, got_eager, strict=True):
            scale = float(w.abs().max())
            assert out.shape == w.shape, name
            torch.testing.assert_close(out.float().cpu(), w, atol=2e-2 * scale, rtol=0, msg=name)
            torch.testing.assert_close(out, out_eager, atol=5e-3 * scale, rtol=0, msg=name)
        top_gpu = BatchDetector(graphs)(images)[0].scores[0]
        top_cpu = BatchDetector(tiny_backend)(images)[0].scores[0]
        assert abs(float(top_gpu) - float(top_cpu)) < 1e-2


class EagerGraph:
    """Stands in for a captured CUDA graph on the CPU: ``replay`` reruns the step into the static outputs."""

    def __init__(self, step, static_in):
        self.step, self.static_in = step, static_in
        self.outputs = step(static_in)

    def replay(self):
        for static, fresh in zip(self.outputs, self.step(self.static_in), strict=True):
            static.copy_(fresh)


def test_fused_postprocess_plumbing_on_the_cpu(tiny_checkpoint, tiny_backend):
    """The fused graph's step (network + decoding + sync-free selection), its bucket padding and
    slicing, and the BatchDetector's handling of ``SelectedOutput`` give the plain CPU path's detections.
    (CUDA graph capture itself is covered by the gpu-marked test below.)"""
    from service.backends.torch import TorchBackend

    fused = TorchBackend(tiny_checkpoint, torch.device("cpu"), max_batch=4, fuse_postprocess=True)
    fused.load()
    fused.fuse_postprocess = True  # normally only with CUDA graphs
    s = fused.loaded_config.input_size
    with torch.inference_mode():
        for b in fused.buckets:
            static_in = torch.zeros(b, 3, s, s)
            graph = EagerGraph(fused._network_and_selection, static_in)
            fused._graphs[b] = (graph, static_in, graph.outputs)
    g = torch.Generator().manual_seed(2)
    for b in (1, 3, 4):  # 3 runs padded in the 4-image bucket
        images = [torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8, generator=g) for _ in range(b)]
        got, want = BatchDetector(fused)(images), BatchDetector(tiny_backend)(images)
        assert all(len(x.scores) > 0 for x in got)  # random weights still give candidates above 0.01
        for x, y in zip(got, want, strict=True):
            torch.testing.assert_close(x.scores, y.scores)
            torch.testing.assert_close(x.labels, y.labels)
            torch.testing.assert_close(x.boxes_xyxy, y.boxes_xyxy)


def test_a_failed_fused_capture_falls_back_to_network_only_graphs(tiny_checkpoint, monkeypatch, caplog):
    """Capturing the post-processing is an optimisation: if it fails, the backend still starts, with
    graphs of the network alone, and says so in the log."""
    from service.backends.torch import TorchBackend

    backend = TorchBackend(tiny_checkpoint, torch.device("cpu"), max_batch=2, fuse_postprocess=True)
    backend.load()
    backend.use_graphs = backend.fuse_postprocess = True  # as on CUDA
    s = backend.loaded_config.input_size

    def capture():
        if backend.fuse_postprocess:
            raise RuntimeError("operation not permitted when stream is capturing")
        with torch.inference_mode():
            for b in backend.buckets:
                static_in = torch.zeros(b, 3, s, s)
                graph = EagerGraph(backend.model, static_in)
                backend._graphs[b] = (graph, static_in, tuple(graph.outputs))

    monkeypatch.setattr(backend, "_capture_graphs", capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    with caplog.at_level("WARNING", logger="refinedet.service"):
        backend.warmup(1)
    assert not backend.fuse_postprocess and sorted(backend._graphs) == [1, 2]
    assert "capturing the network alone" in caplog.text
    images = [torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8) for _ in range(2)]
    assert len(BatchDetector(backend)(images)) == 2


@pytest.mark.gpu
def test_torch_cuda_graphs_with_fused_postprocess_match_separate_postprocess(tiny_checkpoint):
    """The default CUDA path captures network + decoding + sync-free selection in one graph per bucket:
    its detections equal those of the network-only graphs followed by the adaptive post-processing, for
    full and padded buckets, and the NMS converged within the fixed passes."""
    from model.preprocess import preprocess
    from service.backends.base import SelectedOutput

    fused = built(settings(model=tiny_checkpoint, device="cuda", max_batch_size=8))
    separate = built(settings(model=tiny_checkpoint, device="cuda", max_batch_size=8, fuse_postprocess=False))
    for backend in (fused, separate):
        backend.load()
        backend.warmup(1)
    assert fused.fuse_postprocess and sorted(fused._graphs) == [1, 2, 4, 8]
    cfg = fused.loaded_config
    g = torch.Generator().manual_seed(1)
    for b in (1, 3, 8):
        images = [torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8, generator=g) for _ in range(b)]
        batch = preprocess(images, cfg.input_size, cfg.normalization).cuda()
        with torch.inference_mode():
            out = fused.infer(batch)
            assert isinstance(out, SelectedOutput) and bool(out.detections.converged)
            got = BatchDetector(fused).postprocess(out)
            want = PostProcessor(cfg, nms_passes=None)(separate.infer(batch), separate.anchors).to("cpu")
        assert got.scores.shape == want.scores.shape == (b, cfg.postprocess.keep_top_k)
        torch.testing.assert_close(got.scores, want.scores)
        torch.testing.assert_close(got.labels, want.labels)
        torch.testing.assert_close(got.boxes_xyxy, want.boxes_xyxy)


def test_cpu_workers_split_the_cores(monkeypatch):
    import model.cpu as cpu

    monkeypatch.setattr(cpu, "usable_cores", lambda: 8)
    assert settings().serving_for("cpu").threads == 8
    assert settings(workers=4).serving_for("cpu").threads == 2
    assert settings(workers=16).serving_for("cpu").threads == 1
    assert settings(workers=4, cpu_threads=3).serving_for("cpu").threads == 3  # an explicit count wins


def test_cpu_engines_run_on_the_configured_threads(tmp_path):
    pytest.importorskip("onnxruntime")
    path, _ = export_standin(tmp_path)
    before = torch.get_num_threads()
    try:
        backend = built(settings(model=path, cpu_threads=1))
        backend.load()
        assert backend.runner.session.get_session_options().intra_op_num_threads == 1
        assert torch.get_num_threads() == 1  # pre- and post-processing run on the same share
    finally:
        torch.set_num_threads(before)


def test_onnxruntime_cpu_streams_run_one_thread_sessions(tmp_path):
    """Concurrent runs of one multi-thread session would share (and oversubscribe) its pool: a stream
    runs a second, one-thread session of the same model, with the same answers."""
    pytest.importorskip("onnxruntime")
    path, _ = export_standin(tmp_path)
    before = torch.get_num_threads()
    try:
        backend = built(settings(model=path, cpu_threads=2, max_batch_size=4))
        backend.load()
        streamed, plain = BatchDetector(backend, cpu_streams=2), BatchDetector(backend)
        runner = streamed._one_thread_infer.__self__  # what a concurrent call runs: its own session
        assert runner.session.get_session_options().intra_op_num_threads == 1
        assert backend.runner.session.get_session_options().intra_op_num_threads == 2
        images = [torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8) for _ in range(4)]
        one_thread = streamed._run_chunks(images, streamed._one_thread_infer)
        for got, want in zip(one_thread, plain(images), strict=True):
            assert torch.equal(got.labels, want.labels)
            torch.testing.assert_close(got.scores, want.scores, atol=1e-5, rtol=0)
    finally:
        torch.set_num_threads(before)


def test_torch_backend_runs_channels_last_on_a_cpu_with_the_same_answers(tiny_checkpoint):
    from service.backends.torch import TorchBackend

    fast = TorchBackend(tiny_checkpoint, torch.device("cpu"), max_batch=2)
    plain = TorchBackend(tiny_checkpoint, torch.device("cpu"), max_batch=2, channels_last=False)
    fast.load()
    plain.load()
    assert (fast.memory_format, plain.memory_format) == (torch.channels_last, torch.contiguous_format)
    assert fast.model is not None
    conv = next(m for m in fast.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    size = fast.loaded_config.input_size
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    for got, want in zip(fast.infer(x), plain.infer(x), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
