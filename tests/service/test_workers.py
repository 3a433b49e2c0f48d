"""Several workers (``refinedet serve --workers 2``, service/workers.py), against the real command in a
subprocess serving the tiny checkpoint (issue #25, finding 5): /metrics counts every worker's requests
whichever worker answers the scrape; a SIGKILLed worker is replaced while the other serves every
connection, and its replacement takes none before its model is ready; SIGTERM answers the requests in
flight and refuses (never resets) the connections that arrive after it; a model that cannot load stops the
server in one line. And, in-process: an app started with ``serve_when_ready`` takes no connection before
its model is loaded."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from service_testing import encode, gated_loader, noise_image, poll, settings

from service.app import create_app
from service.listener import accept_queue
from service.server import uvicorn_options

JPEG = encode(noise_image(64, 48, seed=3))
CLOSE = {"Connection": "close"}  # every request on a new connection: the workers share them out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Served:
    """``refinedet serve --workers 2`` on the tiny checkpoint, its log in ``log``."""

    def __init__(self, checkpoint: Path, work: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / f"serve-{self.port}.log"
        command = [
            sys.executable, "-m", "refinedet", "serve", "--model", str(checkpoint), "--backend", "torch",
            "--device", "cpu", "--workers", "2", "--port", str(self.port), *extra,
        ]  # fmt: skip
        env = {**os.environ, "REFINEDET_WARMUP_ITERATIONS": "0", "REFINEDET_CACHE_DIR": str(work / "cache")}
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 120) -> None:
        """Until /readyz said 200 twenty times in a row (both workers loaded, whichever answers)."""
        deadline, streak = time.monotonic() + timeout_s, 0
        while streak < 20:
            assert time.monotonic() < deadline, f"not ready in {timeout_s} s:\n{self.tail()}"
            assert self.proc.poll() is None, f"serve exited {self.proc.returncode}:\n{self.tail()}"
            try:
                ok = httpx.get(f"{self.url}/readyz", headers=CLOSE, timeout=5).status_code == 200
            except httpx.TransportError:
                ok = False
            streak = streak + 1 if ok else 0
            if not ok:
                time.sleep(0.05)

    def workers(self) -> list[int]:
        return sorted(int(p) for p in children(self.proc.pid))

    def tail(self) -> str:
        return "\n".join(self.log.read_text().splitlines()[-30:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def children(pid: int) -> list[str]:
    """The worker processes of ``pid`` (multiprocessing's resource tracker left out)."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if (
                entry.name.isdigit()
                and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid
                and b"resource_tracker" not in (entry / "cmdline").read_bytes()
            ):
                found.append(entry.name)
    return found


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics", headers=CLOSE, timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def requests_total(samples: dict, route: str) -> dict[str, float]:
    """``refinedet_http_requests_total`` for ``route``, by status."""
    totals: Counter[str] = Counter()
    for (name, labels), value in samples.items():
        label = dict(labels)
        if name == "refinedet_http_requests_total" and label["route"] == route:
            totals[label["status"]] += value
    return dict(totals)


def detect(url: str) -> str:
    """One POST /detect on a new connection: its status (and error code), or what the client saw."""
    try:
        r = httpx.post(
            f"{url}/detect", content=JPEG, headers={"Content-Type": "image/jpeg", **CLOSE}, timeout=30
        )
    except httpx.TransportError as exc:
        return type(exc).__name__
    return "200" if r.status_code == 200 else f"{r.status_code} {r.json()['error']['code']}"


@pytest.fixture(scope="module")
def two_workers(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    served = Served(tiny_checkpoint, tmp_path_factory.mktemp("workers"))
    try:
        served.wait_ready()
        yield served
    finally:
        served.stop()


def test_metrics_count_every_workers_requests(two_workers: Served):
    """Before: each scrape read the one worker that answered it (12 scrapes: 0,0,1,1,2,...)."""
    url = two_workers.url
    statuses = Counter(detect(url) for _ in range(12))
    assert statuses == {"200": 12}
    for i in range(8):
        samples = scrape(url)
        assert requests_total(samples, "/detect") == {"200": 12}, f"scrape {i}"
        assert requests_total(samples, "/metrics").get("200", 0) == i, (
            "each scrape counted once, when answered"
        )
        assert samples["refinedet_ready", ()] == 2, "both workers ready"
        assert samples["refinedet_http_requests_in_flight", ()] == 1, "this scrape, on whichever worker"
        assert samples["refinedet_batch_size_count", ()] == 12
        # Written by each worker every second (a gauge cannot compute its value in another process).
        assert 0 <= samples["refinedet_engine_seconds_without_progress", ()] < 5, "idle engines: not stalled"


def test_a_killed_worker_is_replaced_while_the_other_serves_every_connection(two_workers: Served):
    """Before: the replacement took connections while its model loaded (503 not_ready)."""
    url = two_workers.url
    before = two_workers.workers()
    assert len(before) == 2
    os.kill(before[0], signal.SIGKILL)
    answers: Counter[str] = Counter()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        answers[detect(url)] += 1
        replaced = set(two_workers.workers()) - set(before)
        if replaced and scrape(url).get(("refinedet_ready", ())) == 2:
            break
    for _ in range(10):  # with the replacement serving too
        answers[detect(url)] += 1
    assert set(answers) == {"200"}, answers
    assert len(two_workers.workers()) == 2 and before[1] in two_workers.workers()
    assert scrape(url)[("refinedet_ready", ())] == 2, f"the replacement is not ready:\n{two_workers.tail()}"
    assert "ended (exit status -9)" in two_workers.log.read_text()


def test_sigterm_answers_what_is_in_flight_and_refuses_what_arrives_after(tiny_checkpoint, tmp_path):
    """Before: connections arriving during the drain were accepted by the kernel (the supervisor still held
    the listening socket), then reset when it exited."""
    served = Served(tiny_checkpoint, tmp_path)
    try:
        served.wait_ready()
        uploads = [slow_upload(served.port) for _ in range(2)]  # in flight across the signal
        poll(
            lambda: scrape(served.url)[("refinedet_http_requests_in_flight", ())] >= 3,
            what="2 uploads in flight",
        )
        served.proc.send_signal(signal.SIGTERM)
        late: list[str] = []
        threads = [threading.Thread(target=lambda: late.append(raw_request(served.port))) for _ in range(6)]
        for (
            thread
        ) in threads:  # arrivals spread over the drain (uvicorn's supervisor took up to 0.5 s to start it)
            thread.start()
            time.sleep(0.3)
        answered = [finish(upload) for upload in uploads]
        for thread in threads:
            thread.join(30)
        code = served.proc.wait(60)
    finally:
        served.stop()
    assert all(a.startswith("HTTP/1.1 200") for a in answered), answered
    assert len(late) == 6 and all(
        o == "refused" or o.startswith(("HTTP/1.1 200", "HTTP/1.1 503")) for o in late
    ), late
    assert code == 0, served.tail()


def slow_upload(port: int) -> socket.socket:
    """A POST /detect whose headers and half its body are sent; ``finish`` sends the rest."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {len(JPEG)}\r\n\r\n"
    )
    sock.sendall(head.encode() + JPEG[: len(JPEG) // 2])
    return sock


def finish(sock: socket.socket) -> str:
    with sock:
        sock.sendall(JPEG[len(JPEG) // 2 :])
        return sock.recv(65536).decode("latin-1")


def raw_request(port: int) -> str:
    """GET /healthz on a new connection: the status line, ``refused``, or what else the client saw."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = sock.recv(65536)
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return type(exc).__name__
    return data.decode("latin-1").split("\r\n")[0] if data else "closed unanswered"


def test_a_model_that_cannot_load_stops_the_server_in_one_line(tmp_path):
    """As with one worker (tests/deploy/test_serve_cli.py); before, each worker answered 503 forever."""
    torn = tmp_path / "torn.pth"
    torn.write_bytes(b"PK\x03\x04 a torn checkpoint")
    served = Served(torn, tmp_path, "--plain-logs")
    try:
        code = served.proc.wait(120)
    finally:
        served.stop()
    last = served.log.read_text().strip().splitlines()[-1]
    assert code == 2 and last.startswith("refinedet serve: error: worker "), served.tail()
    assert "could not start serving (its model failed to load)" in last


def test_an_app_that_serves_when_ready_takes_no_connection_before():
    """A replacement worker's app: its server listens once the model is loaded; a connection queued on the
    shared socket meanwhile is answered then, 200, never 503 not_ready."""
    loader = gated_loader()
    loaded = threading.Event()

    def load(s):
        loaded.wait(30)
        return loader(s)

    app = create_app(settings(), loader=load, serve_when_ready=True)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()  # the shared socket: the other workers listen on it
    port = sock.getsockname()[1]
    options = uvicorn_options(app.state.service.settings)
    config = uvicorn.Config(app, log_level="warning", http=options["http"])
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        answer: list[str] = []
        client = threading.Thread(target=lambda: answer.append(raw_request(port)))
        client.start()
        poll(lambda: accept_queue(sock) == 1, what="the connection queued")
        assert not server.started and not answer, "nobody accepts it while the model loads"
        loaded.set()
        client.join(30)
        assert answer == ["HTTP/1.1 200 OK"]
    finally:
        loaded.set()
        server.should_exit = True
        thread.join(30)
        sock.close()


def test_restart_delay_grows_for_a_crash_loop_only():
    from service.workers import MAX_RESTART_DELAY_S, restart_delay

    assert [restart_delay(k) for k in range(8)] == [0.0, 0.0, 1.0, 2.0, 4.0, 8.0, 16.0, MAX_RESTART_DELAY_S]
    assert restart_delay(50) == MAX_RESTART_DELAY_S


def _exit_at_once() -> None:
    sys.exit(1)


def test_a_worker_that_keeps_dying_is_replaced_after_growing_pauses(monkeypatch, tmp_path):
    """The supervisor's loop with workers that die as they start (a crash loop): the first is replaced at once,
    the next ones after ``restart_delay``'s pauses (scaled down fivefold here), and a signal ends the loop."""
    import multiprocessing

    import service.workers as workers
    from service.workers import Supervisor, Worker

    real, pauses = workers.restart_delay, []

    def scaled(quick_ends: int) -> float:
        pauses.append(real(quick_ends) / 5)
        return pauses[-1]

    monkeypatch.setattr(workers, "restart_delay", scaled)
    supervisor = Supervisor(socket.socket(), {}, count=1, grace_s=1.0)
    supervisor._metrics_dir = str(tmp_path)
    spawned: list[float] = []

    def spawn(replacement: bool) -> Worker:
        spawned.append(time.monotonic())
        ours, _theirs = multiprocessing.Pipe()
        process = multiprocessing.get_context("fork").Process(target=_exit_at_once)
        process.start()
        return Worker(process, ours)

    monkeypatch.setattr(supervisor, "_spawn", spawn)
    supervisor.workers, supervisor.quick_ends = [spawn(False)], [0]
    watcher = threading.Thread(target=supervisor._watch)
    watcher.start()
    poll(lambda: len(spawned) >= 5, timeout_s=20, what="four replacements")
    supervisor._on_signal(signal.SIGTERM, None)
    watcher.join(5)
    assert not watcher.is_alive()
    assert pauses[:4] == [0.0, 0.2, 0.4, 0.8], pauses  # a first end: at once; then growing pauses
    gaps = [b - a for a, b in itertools.pairwise(spawned)][:4]
    for gap, pause in zip(gaps, pauses, strict=False):  # a replacement never starts before its pause is over
        assert gap >= pause, (gaps, pauses)
    assert supervisor.quick_ends[0] >= 4
