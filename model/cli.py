"""``refinedet info`` (the model package's own command) and the package version. The root dispatcher is
``refinedet.cli`` on the top floor."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="print a preset's input size, feature maps, anchors, parameters")
    p.add_argument("preset", help="preset name, e.g. refinedet320_vgg16")
    p.add_argument(
        "--num-classes", type=int, default=None, help="object classes (without background); default 20 (VOC)"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    from model.config import preset

    changes = {}
    if args.num_classes is not None:
        if args.num_classes < 1:
            raise ValueError("--num-classes must be at least 1")
        changes["class_names"] = tuple(f"class{i}" for i in range(args.num_classes))
    config = preset(args.preset, **changes)  # a bad name is reported before torch is imported

    from model.network import build_model, feature_map_sizes

    model = build_model(config)
    info = {
        "preset": config.name,
        "backbone": config.backbone,
        "input_size": config.input_size,
        "num_classes": config.num_classes,
        "feature_maps": feature_map_sizes(model),
        "anchors_per_location": config.anchors.anchors_per_location,
        "num_anchors": int(model.anchors.shape[0]),
        "num_parameters": model.num_parameters(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:22s} {value}")
    return 0
