"""HTTP probes for scripts/container_check.sh, standard library only (it runs on the host's python3).

    container_probe.py ready URL TIMEOUT_S              wait for GET /readyz == 200
    container_probe.py detect URL IMAGE ANNOTATION      POST /detect, check against the VOC annotation
    container_probe.py flood URL IMAGE N OUT.json       N concurrent POST /detect, every status to OUT
    container_probe.py in-flight URL MIN TIMEOUT_S      wait until the server handles >= MIN requests

Each prints one line; a failed check exits 1 with the reason.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

CLASSES = {"Platelets", "RBC", "WBC"}


def fail(message: str) -> None:
    print(f"FAIL: {message}")
    sys.exit(1)


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post_image(url: str, image: bytes, timeout: float = 120.0) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"{url}/detect", data=image, headers={"Content-Type": "image/jpeg"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, urllib.error.URLError) as e:  # connection refused / reset: no answer at all
        return 0, str(e).encode()


def ready(url: str, timeout_s: str) -> None:
    start, deadline = time.monotonic(), time.monotonic() + float(timeout_s)
    while time.monotonic() < deadline:
        try:
            if get(f"{url}/readyz", timeout=2.0)[0] == 200:
                print(f"ready after {time.monotonic() - start:.1f} s")
                return
        except OSError:
            pass
        time.sleep(0.5)
    fail(f"{url}/readyz not 200 within {timeout_s} s")


def detect(url: str, image: str, annotation: str, backend: str = "") -> None:
    """POST the photo; its detections must look like its annotation and, when ``backend`` is given (one name
    or several joined by ``|``), the service must be serving with one of them (the CPU image's default start:
    the CPU engine, openvino or onnxruntime, not the torch fallback)."""
    truth = Counter(o.findtext("name") for o in ET.parse(annotation).getroot().iter("object"))
    status, body = post_image(url, Path(image).read_bytes())
    if status != 200:
        fail(f"POST /detect answered {status}: {body[:300]!r}")
    reply = json.loads(body)
    found = Counter(d["label"] for d in reply["detections"])
    summary = (
        f"{Path(image).name}: annotated {sum(truth.values())} {dict(sorted(truth.items()))}, "
        f"detected {sum(found.values())} {dict(sorted(found.items()))} "
        f"by {reply['model']['backend']} on {reply['model']['device']} in {reply['timings_ms']['total']:.0f} ms"
    )
    if backend and reply["model"]["backend"] not in backend.split("|"):
        fail(
            f"served by {reply['model']['backend']}, expected {backend} (see the CPU engine line in the log); {summary}"
        )
    if not set(found) <= CLASSES:
        fail(f"unknown classes {set(found) - CLASSES}; {summary}")
    if truth["WBC"] and not found["WBC"]:
        fail(f"the white blood cell was missed; {summary}")
    if not 0.5 * truth["RBC"] <= found["RBC"] <= 2 * truth["RBC"] + 2:
        fail(f"RBC count far from the annotation; {summary}")
    print(summary)


def flood(url: str, image: str, n: str, out: str) -> None:
    data, statuses = Path(image).read_bytes(), [0] * int(n)

    def one(i: int) -> None:
        statuses[i] = post_image(url, data)[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(int(n))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    Path(out).write_text(json.dumps({"statuses": statuses}))
    print(f"{statuses.count(200)}/{n} answered 200: {dict(Counter(statuses))}")


def in_flight(url: str, minimum: str, timeout_s: str) -> None:
    deadline = time.monotonic() + float(timeout_s)
    while time.monotonic() < deadline:
        text = get(f"{url}/metrics")[1].decode()
        # The gauge counts /metrics itself: more than MIN means MIN detect requests are in the server.
        m = re.search(r"^refinedet_http_requests_in_flight (\S+)$", text, re.M)
        if m and float(m.group(1)) - 1 >= int(minimum):
            print(f"{float(m.group(1)) - 1:.0f} requests in flight")
            return
        time.sleep(0.05)
    fail(f"fewer than {minimum} requests in flight within {timeout_s} s")


if __name__ == "__main__":
    commands = {"ready": ready, "detect": detect, "flood": flood, "in-flight": in_flight}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    commands[sys.argv[1]](*sys.argv[2:])
