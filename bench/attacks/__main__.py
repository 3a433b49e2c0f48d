"""``python -m bench.attacks``: run the issue-#25 attack phases, print a table, write JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.attacks import Context, phases


def main(argv: list[str] | None = None) -> int:
    known = phases()
    p = argparse.ArgumentParser(prog="python -m bench.attacks", description=__doc__)
    p.add_argument("--phases", default=",".join(known), help=f"comma-separated, of: {', '.join(known)}")
    p.add_argument("--port", type=int, default=18250, help="first port; each phase gets 10 from here on")
    p.add_argument("--quick", action="store_true", help="a smoke run of each phase (fewer requests)")
    p.add_argument("--list", action="store_true", help="list the phases and exit")
    p.add_argument("--out", type=Path, default=Path("/tmp/attacks/attacks.json"))
    args = p.parse_args(argv)
    if args.list:
        for name, module in known.items():
            print(f"{name:12} {module.HELP}")
        return 0
    chosen = [name.strip() for name in args.phases.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in known]
    if unknown:
        p.error(f"unknown phase(s) {', '.join(unknown)}; known: {', '.join(known)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"command": " ".join(sys.argv), "cpus": os.cpu_count(), "phases": {}}
    for i, name in enumerate(chosen):
        ctx = Context(port=args.port + 10 * i, work_dir=args.out.parent / name, quick=args.quick)
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        result = known[name].run(ctx)
        result["seconds"] = round(time.monotonic() - start, 1)
        report["phases"][name] = result
        print(f"[{name}] {'ok' if result.get('ok') else 'FAILED'} in {result['seconds']} s")
        for key, value in result.items():
            if key not in ("ok", "seconds"):
                print(f"    {key}: {value}")
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten {args.out}")
    return 0 if all(r.get("ok") for r in report["phases"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
