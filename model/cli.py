"""``refinedet info`` (the model package's own command) and the package version. The root dispatcher is
``refinedet.cli`` on the top floor."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="list the model presets, or print one's input size, feature maps, anchors, parameters",
        description="Without PRESET: the presets. With it: its input size, feature maps, anchors and "
        "parameter count for a class count: --num-classes, else the shipped model's classes for the "
        "shipped model's preset and the preset's own (20 PASCAL VOC classes) for the others.",
    )
    p.add_argument("preset", nargs="?", help="preset name, e.g. refinedet320_vgg16 (none: list the presets)")
    p.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="object classes (without background); default: see above, the output says which",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_info)


def _print(info: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:22s} {value}")


def list_presets(as_json: bool) -> int:
    """The presets with their backbone, input size and default classes; the shipped model's is marked."""
    from model.config import PRESETS
    from model.zoo import DEFAULT_PRESET, default_checkpoint

    shipped = DEFAULT_PRESET if default_checkpoint() is not None else None
    rows = []
    for name, factory in PRESETS.items():
        config = factory()
        rows.append(
            {
                "preset": name,
                "backbone": config.backbone,
                "input_size": config.input_size,
                "shipped_model": name == shipped,
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'preset':24s} {'backbone':10s} input")
    for row in rows:
        note = "  (the shipped BCCD model's)" if row["shipped_model"] else ""
        print(f"{row['preset']:24s} {row['backbone']:10s} {row['input_size']}{note}")
    print("details: refinedet info PRESET [--num-classes N]")
    return 0


def info_classes(name: str, num_classes: int | None) -> tuple[dict[str, object], str | None]:
    """(config changes, which classes were assumed; None: the preset's own) for ``info PRESET``."""
    from model.zoo import DEFAULT_CLASSES, DEFAULT_PRESET, default_checkpoint

    if num_classes is not None:
        if num_classes < 1:
            raise ValueError("--num-classes must be at least 1")
        return {
            "class_names": tuple(f"class{i}" for i in range(num_classes))
        }, f"{num_classes} (--num-classes)"
    if name == DEFAULT_PRESET and default_checkpoint() is not None:
        names = ", ".join(DEFAULT_CLASSES)
        return {"class_names": DEFAULT_CLASSES}, f"{len(DEFAULT_CLASSES)}, the shipped model's ({names})"
    return {}, None


def cmd_info(args: argparse.Namespace) -> int:
    from model.config import VOC_CLASSES, preset

    if args.preset is None:
        return list_presets(args.json)
    preset(args.preset)  # a bad name is reported before torch is imported
    changes, classes = info_classes(args.preset, args.num_classes)
    config = preset(args.preset, **changes)
    if classes is None:
        names = "PASCAL VOC" if config.class_names == VOC_CLASSES else ", ".join(config.class_names)
        classes = f"{len(config.class_names)}, the preset's ({names}); --num-classes N for others"

    from model.network import build_model, feature_map_sizes

    model = build_model(config)
    info = {
        "preset": config.name,
        "backbone": config.backbone,
        "input_size": config.input_size,
        "classes": classes,
        "num_classes": config.num_classes,
        "feature_maps": feature_map_sizes(model),
        "anchors_per_location": config.anchors.anchors_per_location,
        "num_anchors": int(model.anchors.shape[0]),
        "num_parameters": model.num_parameters(),
    }
    _print(info, args.json)
    return 0
