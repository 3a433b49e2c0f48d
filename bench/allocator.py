"""The serving process's allocator settings, compared: latency of one client and RSS around a burst of
large uploads, for ``default`` (service.process: glibc mmap threshold 32 MiB, Pillow 64 MiB blocks),
``mmap4`` (a 4 MiB threshold, Pillow's 16 MiB blocks) and ``adaptive`` (glibc's and Pillow's own).

    python -m bench.allocator [--variants default,mmap4,adaptive] [--port 18950] [--json out/alloc.json]

Each variant starts `refinedet serve --backend torch --device cpu` (the shipped model) on 127.0.0.1,
times 25 sequential /detect calls with a BCCD photo (or a synthetic JPEG), posts 16 concurrent 6300x6300
PNGs (under the 40 MP limit; the pixel budget refuses most), and reads VmRSS / VmHWM from /proc.
Loopback only, bounded in count and time.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PATCHES = {
    "default": "",
    "mmap4": "s.cap_mmap_threshold = lambda: bool(ctypes.CDLL('libc.so.6').mallopt(-3, 4 << 20))\n"
    "s.set_pil_block_size = lambda size=0: None\n",
    "adaptive": "s.cap_mmap_threshold = lambda: False\ns.set_pil_block_size = lambda size=0: None\n",
}


def launcher(variant: str, port: int) -> str:
    return (
        "import ctypes\nimport service.process as s\n" + PATCHES[variant] + "from refinedet.cli import main\n"
        f"main(['serve', '--backend', 'torch', '--device', 'cpu', '--port', '{port}', '--log-level', 'warning'])\n"
    )


def post(url: str, body: bytes, content_type: str) -> tuple[int, float]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return status, time.perf_counter() - start


def rss_mb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) // 1024
    return -1


def photo() -> bytes:
    from bench.common import bccd_jpeg_dir

    folder = bccd_jpeg_dir()
    if folder is not None:
        return (folder / "BloodImage_00000.jpg").read_bytes()
    buf = io.BytesIO()
    Image.effect_noise((640, 480), 40).convert("RGB").save(buf, "JPEG")
    return buf.getvalue()


def measure(variant: str, port: int, jpeg: bytes, big: bytes) -> dict[str, Any]:
    proc = subprocess.Popen([sys.executable, "-c", launcher(variant, port)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        else:
            raise RuntimeError(f"{variant}: the server was not ready after 180 s")
        for _ in range(3):
            post(f"{base}/detect", jpeg, "image/jpeg")
        latency = [post(f"{base}/detect", jpeg, "image/jpeg")[1] for _ in range(25)]
        idle = rss_mb(proc.pid, "VmRSS")
        with ThreadPoolExecutor(16) as pool:
            statuses = [s for s, _ in pool.map(lambda _: post(f"{base}/detect", big, "image/png"), range(16))]
        time.sleep(2)
        return {"variant": variant, "p50_ms": round(statistics.median(latency) * 1000, 1), "rss_idle_mb": idle,
                "rss_peak_mb": rss_mb(proc.pid, "VmHWM"), "rss_after_mb": rss_mb(proc.pid, "VmRSS"),
                "large_uploads": {str(s): statuses.count(s) for s in sorted(set(statuses))}}  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="default,mmap4,adaptive")
    p.add_argument("--port", type=int, default=18950)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    if unknown := set(variants) - set(PATCHES):
        p.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(PATCHES)}")
    buf = io.BytesIO()
    Image.new("RGB", (6300, 6300), (200, 30, 30)).save(buf, "PNG")
    rows = [measure(v, args.port, photo(), buf.getvalue()) for v in variants]
    print(f"{'variant':10s} {'p50 ms':>8s} {'idle MB':>8s} {'peak MB':>8s} {'after MB':>9s}  large uploads")
    for r in rows:
        print(f"{r['variant']:10s} {r['p50_ms']:8.1f} {r['rss_idle_mb']:8d} {r['rss_peak_mb']:8d} "
              f"{r['rss_after_mb']:9d}  {r['large_uploads']}")  # fmt: skip
    if args.json:
        from bench.common import environment, write_json

        write_json(args.json, {"environment": environment(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
