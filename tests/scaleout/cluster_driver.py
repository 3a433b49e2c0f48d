"""Run inside the loopback-only namespace by ``tests/scaleout/test_ray_cluster.py``, against a two-node Ray
cluster started there: Ray Serve (correctness against the service run directly, both nodes serving, one
replica killed under load, overhead) and the Ray Data job on BCCD (rows equal to ``refinedet predict``'s,
resume, a bad file). Writes its findings as JSON to ``argv[1]``; the test asserts on them.

    python tests/scaleout/cluster_driver.py RESULT.json RAY_ADDRESS WORKDIR BCCD_JPEG_DIR
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "service"))

from service_testing import encode, noise_image, serving, tiny_config  # noqa: E402

PORT = 18301
IMAGE = encode(noise_image(96, 72, seed=1))


def main(result_path: str, address: str, workdir: str, bccd: str) -> None:
    import ray

    work = Path(workdir)
    ray.init(address=address, log_to_driver=False)
    results: dict = {"head_node": ray.get_runtime_context().get_node_id(), "nodes": len(ray.nodes())}
    try:
        results["serve"] = serve_checks(work, results["head_node"])
    except Exception as exc:
        results["serve_error"] = f"{type(exc).__name__}: {exc}"
    try:
        results["data"] = data_checks(work, Path(bccd))
    except Exception as exc:
        results["data_error"] = f"{type(exc).__name__}: {exc}"
    Path(result_path).write_text(json.dumps(results, indent=2))


def serve_checks(work: Path, head_node: str) -> dict:
    import torch
    from ray import serve

    from deploy.prepare import prepare
    from model.checkpoint import save_checkpoint
    from model.network import build_model
    from scaleout.ingress import start
    from scaleout.serve import APP_NAME, build_app
    from service.app import create_app
    from service.settings import Settings

    torch.manual_seed(0)
    checkpoint = work / "tiny.pth"
    save_checkpoint(checkpoint, build_model(tiny_config()), metadata={"note": "cluster test"})
    settings = Settings(
        model=checkpoint, device="cpu", warmup_iterations=0, access_log=False, max_batch_size=2,
        max_delay_ms=1.0, request_timeout_s=20,
    )  # fmt: skip
    out: dict = {}
    out["ingress"] = start("127.0.0.1", PORT, "HeadOnly")  # auto: HAProxy, installed with ray[serve]
    out["haproxy_running"] = haproxy_running()
    started = time.monotonic()
    serve.run(
        build_app(settings, 2, 0.0, {"resources": {"slot": 1}}),
        name=APP_NAME,
        route_prefix="/",
        blocking=False,
    )
    url = f"http://127.0.0.1:{PORT}"
    client = httpx.Client(base_url=url, timeout=30)
    wait_ready(client)
    out["deploy_s"] = round(time.monotonic() - started, 1)

    # Same engine and answers as the service run directly (`refinedet serve`'s decision on this node, made
    # by the same function from the same cache; in this process, uvicorn on loopback).
    plan = prepare(settings)
    with (
        serving(create_app(settings, plan=plan)) as (direct_url, _),
        httpx.Client(base_url=direct_url, timeout=30) as direct,
    ):
        out["model"] = {"serve": client.get("/v1/model").json(), "direct": direct.get("/v1/model").json()}
        out["plan"] = plan.to_dict()
        out["same"] = compare(client, direct)
        out["request_ids"] = [len(r.headers.get_list("x-request-id")) for r in served_raw(client)]
        out["latency_ms"] = {"serve": latency(client), "direct": latency(direct)}

    # Requests reach replicas on both nodes.
    served = concurrent_load(client, threads=4, seconds=4.0)
    out["nodes_serving"] = sorted({r["node"] for r in served if r["node"]})
    out["before_kill"] = summary(served)

    # One replica (on the worker node) killed under load.
    handle = serve.get_deployment_handle("Detector", app_name=APP_NAME)
    where = {}
    for _ in range(40):
        w = handle.where.remote().result()
        where[w["node_id"]] = w
        if len(where) == 2:
            break
    victim = next(w for node, w in where.items() if node != head_node)
    out["killed"] = {"node": victim["node_id"][:12], "replica": victim["replica"]}
    timer = threading.Timer(1.5, os.kill, (victim["pid"], signal.SIGKILL))
    timer.start()
    # 16 clients: with the CPU engine a request spends little of its time in the replica, so fewer clients
    # can leave the victim holding nothing at the kill, and the retry would go unseen.
    under_kill = concurrent_load(client, threads=16, seconds=8.0)
    out["during_kill"] = summary(under_kill)
    out["retried"] = sum(r["attempts"] > 1 for r in under_kill)
    out["victim_dead"] = not pid_alive(victim["pid"])
    out["replicas_seen_after_kill"] = len({r["replica"] for r in under_kill if r["replica"]})
    out["bad_answers"] = [
        r for r in under_kill if not (r["status"] == 200 or (r["status"] == 503 and r["json_error"]))
    ][:5]
    out["replicas_after"] = wait_replicas(serve, 2, timeout_s=60)

    # The `--direct` shape (replicas are Serve's HTTP ingress): the same engine and answers, both nodes serve.
    serve.delete(APP_NAME)
    serve.run(build_app(settings, 2, 0.0, {"resources": {"slot": 1}}, retry=False), name=APP_NAME,
              route_prefix="/", blocking=False)  # fmt: skip
    wait_ready(client)
    out["direct_shape_replicas"] = wait_replicas(serve, 2, timeout_s=120)
    with (
        serving(create_app(settings, plan=plan)) as (direct_url, _),
        httpx.Client(base_url=direct_url, timeout=30) as direct,
    ):
        out["direct_shape"] = {"model": client.get("/v1/model").json(), "same": compare(client, direct)}
    served = concurrent_load(client, threads=4, seconds=4.0)
    out["direct_shape"]["nodes_serving"] = sorted({r["node"] for r in served if r["node"]})
    out["direct_shape"]["load"] = summary(served)
    out["direct_shape"]["request_ids"] = [len(r.headers.get_list("x-request-id")) for r in served_raw(client)]
    serve.shutdown()

    # The other ingress: Serve's Python proxy (`--ingress serve-proxy`), the same answers.
    out["serve_proxy"] = {"ingress": start("127.0.0.1", PORT, "HeadOnly", ingress="serve-proxy")}
    serve.run(build_app(settings, 2, 0.0, {"resources": {"slot": 1}}, retry=False), name=APP_NAME,
              route_prefix="/", blocking=False)  # fmt: skip
    wait_ready(client)
    out["serve_proxy"]["haproxy_running"] = haproxy_running()
    with (
        serving(create_app(settings, plan=plan)) as (direct_url, _),
        httpx.Client(base_url=direct_url, timeout=30) as direct,
    ):
        out["serve_proxy"]["same"] = compare(client, direct)
    out["serve_proxy"]["request_ids"] = [len(r.headers.get_list("x-request-id")) for r in served_raw(client)]
    serve.shutdown()
    return out


def haproxy_running() -> bool:
    """Whether an HAProxy process runs in this (the test's) PID namespace."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if Path(cmdline.read_bytes().split(b"\0")[0].decode(errors="replace")).name == "haproxy":
                return True
        except OSError:
            continue
    return False


def served_raw(client: httpx.Client, n: int = 4) -> list[httpx.Response]:
    """``n`` answers: a detection, a bad upload, the model and a readiness probe."""
    return [
        client.post("/detect", content=IMAGE, headers={"content-type": "image/jpeg"}),
        client.post("/detect", content=b"GIF89a....", headers={"content-type": "image/gif"}),
        client.get("/v1/model"),
        client.get("/readyz"),
    ][:n]


def wait_ready(client: httpx.Client, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("Serve app not ready")


def compare(serve_client: httpx.Client, direct: httpx.Client) -> dict:
    """/detect, /v2 infer and error answers through Serve vs the service directly."""

    def detect(c: httpx.Client, data: bytes, ctype: str = "image/jpeg") -> httpx.Response:
        return c.post(
            "/detect", content=data, headers={"content-type": ctype}, params={"score_threshold": 0.3}
        )

    a, b = detect(serve_client, IMAGE), detect(direct, IMAGE)
    same = {"detect": a.status_code == 200 and a.json()["detections"] == b.json()["detections"]}
    same["detections"] = len(a.json()["detections"])
    same["served_by_header"] = "x-served-by" in a.headers
    for name, data, ctype in (
        ("undecodable", b"\xff\xd8junk", "image/jpeg"),
        ("unsupported", b"GIF89a....", "image/gif"),
    ):
        x, y = detect(serve_client, data, ctype), detect(direct, data, ctype)
        same[name] = [x.status_code, x.json()] == [y.status_code, y.json()] and x.status_code >= 400
    import base64

    name = direct.get("/v1/model").json()["name"]
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(IMAGE).decode()]}],
            "parameters": {"score_threshold": 0.3}}  # fmt: skip
    x, y = (c.post(f"/v2/models/{name}/infer", json=body) for c in (serve_client, direct))
    same["v2_infer"] = x.status_code == 200 and x.json()["outputs"] == y.json()["outputs"]
    return same


def latency(client: httpx.Client, n: int = 40) -> dict:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        r = client.post("/detect", content=IMAGE, headers={"content-type": "image/jpeg"})
        times.append((time.perf_counter() - start) * 1e3)
        assert r.status_code == 200, r.text
    times.sort()
    return {"p50": round(statistics.median(times), 2), "p90": round(times[int(0.9 * n)], 2), "n": n}


def concurrent_load(client: httpx.Client, threads: int, seconds: float) -> list[dict]:
    answers: list[dict] = []
    stop = time.monotonic() + seconds

    def worker() -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=30) as c:
            while time.monotonic() < stop:
                try:
                    r = c.post("/detect", content=IMAGE, headers={"content-type": "image/jpeg"})
                    answers.append(answer(r))
                except httpx.HTTPError as exc:
                    answers.append(
                        {"status": None, "error": type(exc).__name__, "node": None, "json_error": False}
                    )

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return answers


def answer(r: httpx.Response) -> dict:
    try:
        body = r.json()
    except ValueError:
        body = None
    json_error = isinstance(body, dict) and isinstance(body.get("error"), dict) and "code" in body["error"]
    node, _, replica = r.headers.get("x-served-by", "").partition("/")
    return {"status": r.status_code, "node": node or None, "replica": replica or None, "json_error": json_error,
            "attempts": int(r.headers.get("x-attempts", "1")), "text": None if r.status_code == 200 else r.text[:200]}  # fmt: skip


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def summary(answers: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for a in answers:
        counts[str(a["status"])] = counts.get(str(a["status"]), 0) + 1
    return {"requests": len(answers), "by_status": counts}


def wait_replicas(serve, want: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    running = 0
    while time.monotonic() < deadline:
        app = serve.status().applications.get("refinedet")
        if app is not None:
            running = app.deployments["Detector"].replica_states.get("RUNNING", 0)
            if running >= want:
                return running
        time.sleep(1)
    return running


def data_checks(work: Path, bccd: Path) -> dict:
    from deploy.prepare import plan_for_files
    from model.evaluation.predict import ImagePredictor, PredictionLog, iter_inputs, predict_files
    from model.runtime.plan import build_network
    from model.zoo import DEFAULT_CHECKPOINT
    from scaleout.data_job import run_job

    checkpoint = str(DEFAULT_CHECKPOINT)
    images = sorted(bccd.glob("*.jpg"))[:10]
    bad = work / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    listing = work / "images.txt"
    listing.write_text("".join(f"{p}\n" for p in [*images[:5], bad, *images[5:]]))
    run = {"checkpoint": checkpoint, "score_threshold": 0.5}
    out: dict = {"listed": 11}

    # `refinedet predict`'s engine: the decision each actor makes on its node, for one thread (num_cpus=1).
    plan = plan_for_files(checkpoint, "cpu", 2, threads=1)
    out["plan"] = plan.to_dict()
    predictor = ImagePredictor(build_network(plan), plan.device, 0.5)
    local = PredictionLog(work / "local", run, overwrite=True, retry_errors=False)
    started = time.perf_counter()
    out["local_counts"] = predict_files(predictor, iter_inputs([], [listing]), local, batch_size=2)
    out["local_s"] = round(time.perf_counter() - started, 1)
    local.close()

    # A job that "crashed" after its first 4 images (their rows are on disk), resumed on the cluster.
    first = PredictionLog(work / "ray", run, overwrite=True, retry_errors=False)
    predict_files(predictor, list(iter_inputs([], [listing]))[:4], first, batch_size=2)
    first.close()
    resumed = PredictionLog(work / "ray", run, overwrite=False, retry_errors=False)
    started = time.perf_counter()
    out["ray_counts"] = run_job(
        iter_inputs([], [listing]), resumed, checkpoint, 0.5, actors=2, batch_size=2, gpus_per_actor=0.0
    )
    out["ray_s"] = round(time.perf_counter() - started, 1)
    resumed.close()

    rows = {
        name: [json.loads(x) for x in (work / name / "detections.jsonl").read_text().splitlines()]
        for name in ("local", "ray")
    }
    out["rows"] = {k: len(v) for k, v in rows.items()}
    by_file = {k: {r["file"]: r for r in v} for k, v in rows.items()}
    out["files_equal"] = sorted(by_file["local"]) == sorted(by_file["ray"])
    out["bad_row"] = by_file["ray"].get(str(bad), {}).get("error", "")
    out["max_box_diff"], out["max_score_diff"], out["label_mismatch"], out["detections"] = diff(
        by_file["local"], by_file["ray"]
    )
    return out


def diff(a: dict, b: dict) -> tuple[float, float, int, int]:
    box = score = 0.0
    mismatched = found = 0
    for file, row in a.items():
        other = b.get(file, {})
        da, db = row.get("detections", []), other.get("detections", [])
        if len(da) != len(db):
            mismatched += 1
            continue
        for x, y in zip(da, db, strict=True):
            found += 1
            mismatched += x["class_id"] != y["class_id"]
            score = max(score, abs(x["score"] - y["score"]))
            box = max(box, *(abs(x["box"][k] - y["box"][k]) for k in x["box"]))
    return box, score, mismatched, found


if __name__ == "__main__":
    main(*sys.argv[1:5])
