"""A real two-node Ray cluster, started in a network namespace that has only loopback (and its own PID
namespace, so the kernel ends every process of it when the test is done): Ray Serve and the Ray Data job
checked by ``cluster_driver.py`` inside it. Skipped where Ray, root or ``unshare`` is missing."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import bccd_root

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BCCD = (bccd_root() or Path("/work/shared/data/BCCD")) / "JPEGImages"
TIMEOUT_S = 420

pytestmark = pytest.mark.ray

SCRIPT = r"""
set -eu
ip link set lo up
export RAY_USAGE_STATS_ENABLED=0 PYTHONPATH="$ROOT" OMP_NUM_THREADS=1 REFINEDET_CACHE_DIR="$WORK/cache"
# One proxy for both nodes (they share loopback): without this it sends `--direct` traffic to its own node's
# replica only (Ray's default, right where every node has a proxy behind a load balancer).
export RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING=0
# HAProxy ingress: a stopped ingress replica drains for this long (Ray's default 30 s, for load balancers to
# notice) before Serve can shut down; the test starts Serve three times.
export RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=1
RAY="$PYBIN/ray"
"$RAY" start --head --node-ip-address=127.0.0.1 --port=6380 --num-cpus=2 --resources='{"slot": 1}' \
  --include-dashboard=false --temp-dir="$WORK/ray" --disable-usage-stats >"$WORK/head.log" 2>&1
"$RAY" start --address=127.0.0.1:6380 --node-ip-address=127.0.0.1 --num-cpus=2 --resources='{"slot": 1}' \
  >"$WORK/worker.log" 2>&1
trap '"$RAY" stop --force >/dev/null 2>&1 || true' EXIT
"$PYBIN/python" "$ROOT/tests/scaleout/cluster_driver.py" "$WORK/result.json" 127.0.0.1:6380 "$WORK" "$BCCD"
"""


def skip_reason() -> str | None:
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed (pip install -e '.[scale]')"
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs root, unshare and ip to start Ray in a loopback-only network namespace"
    if not BCCD.is_dir():
        return f"BCCD images not found at {BCCD} (set REFINEDET_BCCD)"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> dict:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("ray")
    env = {**os.environ, "ROOT": str(ROOT), "WORK": str(work), "BCCD": str(BCCD),
           "PYBIN": str(Path(sys.executable).parent)}  # fmt: skip
    command = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "bash", "-c", SCRIPT]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    result = work / "result.json"
    assert proc.returncode == 0 and result.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(result.read_text())


def test_two_nodes_serve_the_same_answers_as_the_service(cluster):
    assert cluster["nodes"] == 2
    serve = cluster.get("serve") or pytest.fail(cluster.get("serve_error"))
    assert serve["same"]["detections"] > 0
    assert {k: v for k, v in serve["same"].items() if v is False} == {}, serve["same"]
    assert len(serve["nodes_serving"]) == 2, serve["nodes_serving"]
    # The replicas serve the engine `refinedet serve` decides on their node (deploy.prepare), not the checkpoint
    # with PyTorch whatever the machine: the same backend and precision as the service started directly.
    replica, direct = serve["model"]["serve"], serve["model"]["direct"]
    assert (replica["backend"], replica["precision"]) == (direct["backend"], direct["precision"]), serve[
        "model"
    ]
    assert (direct["backend"], direct["precision"]) == (serve["plan"]["backend"], serve["plan"]["precision"])
    assert serve["before_kill"]["by_status"] == {"200": serve["before_kill"]["requests"]}


def test_a_killed_replica_loses_no_request(cluster):
    serve = cluster.get("serve") or pytest.fail(cluster.get("serve_error"))
    during = serve["during_kill"]
    assert during["requests"] > 20, during
    assert serve["bad_answers"] == [], serve["bad_answers"]  # each one 200, or a JSON 503
    assert set(during["by_status"]) <= {"200", "503"}, during
    # Serve replaced the killed replica.
    assert serve["victim_dead"] and serve["replicas_after"] == 2, {
        k: serve.get(k) for k in ("killed", "victim_dead", "replicas_after")
    }
    # The requests the dead replica held were sent to another one (or, failing that, got a JSON 503).
    assert serve["retried"] >= 1 or during["by_status"].get("503", 0) >= 1, (serve["retried"], during)


def test_the_direct_shape_serves_the_same_answers_on_both_nodes(cluster):
    """`refinedet ray-serve --direct`: the replicas are Serve's HTTP ingress (no ingress hop)."""
    serve = cluster.get("serve") or pytest.fail(cluster.get("serve_error"))
    direct = serve["direct_shape"]
    assert direct["same"]["detections"] > 0
    assert {k: v for k, v in direct["same"].items() if v is False} == {}, direct["same"]
    assert len(direct["nodes_serving"]) == 2, direct["nodes_serving"]
    model = direct["model"]
    assert (model["backend"], model["precision"]) == (serve["plan"]["backend"], serve["plan"]["precision"])
    assert direct["load"]["by_status"] == {"200": direct["load"]["requests"]}, direct["load"]


def test_haproxy_is_the_default_ingress_and_serve_proxy_answers_the_same(cluster):
    """`--ingress auto` picks Ray Serve's HAProxy ingress (ray[serve] installs HAProxy); `serve-proxy` runs no
    HAProxy and answers as the service does. Either way one X-Request-ID per answer."""
    serve = cluster.get("serve") or pytest.fail(cluster.get("serve_error"))
    assert serve["ingress"] == "haproxy" and serve["haproxy_running"], serve["ingress"]
    other = serve["serve_proxy"]
    assert other["ingress"] == "serve-proxy" and not other["haproxy_running"], other
    assert {k: v for k, v in other["same"].items() if v is False} == {}, other["same"]
    assert serve["request_ids"] == [1, 1, 1, 1] and serve["direct_shape"]["request_ids"] == [1, 1, 1, 1]
    assert other["request_ids"] == [1, 1, 1, 1]


def test_ray_data_job_equals_predict_and_resumes(cluster):
    data = cluster.get("data") or pytest.fail(cluster.get("data_error"))
    assert data["local_counts"] == {"images": 11, "errors": 1, "skipped": 0}
    assert data["plan"]["engine"] != "torch-fp32", data[
        "plan"
    ]  # the shipped model's CPU engine, not eager torch
    assert data["ray_counts"] == {"images": 7, "errors": 1, "skipped": 4}  # the first 4 were done
    assert data["rows"] == {"local": 11, "ray": 11} and data["files_equal"]
    assert "not a readable image" in data["bad_row"]
    assert data["detections"] > 50 and data["label_mismatch"] == 0
    assert data["max_score_diff"] <= 1e-3 and data["max_box_diff"] <= 0.05
