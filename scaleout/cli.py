"""``refinedet ray-serve`` and ``refinedet ray-predict``. Only argparse at import time."""

from __future__ import annotations

import argparse
import time

from scaleout.ingress import INGRESSES


def register(subparsers: argparse._SubParsersAction) -> None:
    from model.evaluation.cli import add_predict_arguments

    s = subparsers.add_parser(
        "ray-serve",
        help="serve the detection API on a Ray cluster with Ray Serve (extra 'scale')",
        description="Deploys the service's app on Ray Serve: REPLICAS model replicas (1 GPU each when the "
        "cluster has GPUs) behind Serve's HTTP ingress on every node. Each replica serves the engine "
        "`refinedet serve` would serve on its node (deploy.prepare, from that node's REFINEDET_CACHE_DIR). "
        "Every other setting is the service's REFINEDET_* environment (see `refinedet serve --help`).",
    )
    s.add_argument("--address", default="auto", help="Ray cluster address (default: auto, the local cluster)")
    s.add_argument(
        "--host",
        default="0.0.0.0",
        help="address the ingress listens on (default 0.0.0.0); with haproxy the replicas listen on it too, "
        "for the other nodes' HAProxy",
    )
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--replicas", type=int, default=2, help="model replicas (default 2)")
    s.add_argument(
        "--model", help="checkpoint, .onnx or .plan (default: REFINEDET_MODEL, else the shipped model)"
    )
    s.add_argument(
        "--gpus-per-replica", type=float, default=None, help="default: 1 if the cluster has GPUs, else 0"
    )
    s.add_argument(
        "--ingress",
        choices=INGRESSES,
        default="auto",
        help="what takes HTTP requests on each node: haproxy (Ray Serve's HAProxy ingress, replicas serve HTTP "
        "themselves), serve-proxy (Serve's Python proxy actor) or auto (default: haproxy where HAProxy is "
        "installed, as ray[serve] does on Linux). A Serve already running keeps its own",
    )
    s.add_argument(
        "--direct",
        action="store_true",
        help="replicas are the HTTP ingress: no handle hop (per replica, 0.97x `refinedet serve`'s req/s on 2 "
        "cores behind haproxy), but a replica that dies mid-request loses what it holds (its connections close, "
        "or a 500). Default: a light ingress sends such requests to another replica (0.88-0.94x; docs/scaling.md)",
    )
    s.add_argument("--no-block", action="store_true", help="deploy and return (Serve keeps running)")
    s.set_defaults(handler=cmd_ray_serve)

    p = subparsers.add_parser(
        "ray-predict",
        help="refinedet predict on Ray Data: an actor pool of detectors over a cluster (extra 'scale')",
        description="As `refinedet predict` (same rows, same resumable OUTPUT/detections.jsonl), with the "
        "images spread over ACTORS model actors on a Ray cluster. Paths must be visible to every node.",
    )
    add_predict_arguments(p)
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    p.add_argument("--actors", type=int, default=2, help="detector actors (default 2)")
    p.add_argument(
        "--gpus-per-actor", type=float, default=None, help="default: 1 if the cluster has GPUs, else 0"
    )
    p.set_defaults(handler=cmd_ray_predict)


def _require_ray() -> None:
    from model.errors import UserError

    try:
        import ray  # noqa: F401
    except ModuleNotFoundError:
        raise UserError("Ray is not installed: pip install 'refinedet[scale]'") from None


def cmd_ray_serve(args: argparse.Namespace) -> int:
    from model.errors import UserError

    _require_ray()
    if args.replicas < 1:
        raise UserError(f"--replicas must be at least 1, got {args.replicas}")
    from deploy.prepare import resolve_model
    from scaleout.serve import run
    from service.settings import Settings

    settings = Settings(**({"model": args.model} if args.model else {}))
    resolve_model(settings.model)  # a missing model is reported here, not by every replica
    run(settings, args.address, args.host, args.port, args.replicas, args.gpus_per_replica, not args.no_block,
        retry=not args.direct, ingress=args.ingress)  # fmt: skip
    return 0


def cmd_ray_predict(args: argparse.Namespace) -> int:
    from model.errors import UserError
    from model.evaluation.cli import check_predict_options, predict_run_record, predict_source

    _require_ray()
    check_predict_options(args)
    if args.actors < 1:
        raise UserError(f"--actors must be at least 1, got {args.actors}")
    if args.annotate:
        raise UserError("--annotate is for `refinedet predict`; ray-predict writes rows only")
    import ray
    from tqdm import tqdm

    from model.evaluation.predict import PredictionLog, iter_inputs
    from scaleout.data_job import run_job
    from scaleout.serve import gpus_per_replica

    source, config = predict_source(args)
    log = PredictionLog(
        args.output, predict_run_record(args, source, config), args.overwrite, args.retry_errors
    )
    ray.init(address=args.address, log_to_driver=False)
    gpus = gpus_per_replica(args.gpus_per_actor)
    bar = tqdm(desc="ray-predict", unit="img", disable=args.no_progress)
    start = time.perf_counter()
    try:
        counts = run_job(
            iter_inputs(args.images, args.list), log, args.checkpoint or args.artifact, args.score_threshold,
            args.actors, args.batch_size, gpus, on_rows=bar.update,
        )  # fmt: skip
    finally:
        bar.close()
        log.close()
    seconds = time.perf_counter() - start
    print(
        f"{counts['images']} images in {seconds:.1f} s on {args.actors} actor(s), {gpus:g} GPU each "
        f"({counts['errors']} errors), {counts['skipped']} already done; rows in {log.path}"
    )
    return 0
