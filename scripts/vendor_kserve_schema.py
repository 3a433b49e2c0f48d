"""Write k8s/schemas/kserve-<version>-inferenceservice.json from a kserve wheel (PyPI), without installing it.

The wheel's ``kserve/models`` are generated from KServe's published OpenAPI spec; each class lists its fields
(``attribute_map``: Python name -> JSON key) and their types (``openapi_types``). This keeps, for every KServe
type reachable from ``V1beta1InferenceService``, {JSON key: type}; Kubernetes types (``V1Container`` ...) are
left to Kubernetes' own schema (kubernetes-validate). Read with ``ast``: nothing from the wheel runs.

    pip download --no-deps kserve==0.21.0 -d /tmp/kserve
    python scripts/vendor_kserve_schema.py /tmp/kserve/kserve-0.21.0-py3-none-any.whl
"""

from __future__ import annotations

import ast
import json
import re
import sys
import zipfile
from pathlib import Path

ROOT = "V1beta1InferenceService"


def class_fields(source: str) -> dict[str, dict[str, str]]:
    """{class name: {JSON key: type}} of a generated model module."""
    found = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        values = {}
        for item in node.body:
            if not isinstance(item, ast.Assign):
                continue
            target = item.targets[0]
            if isinstance(target, ast.Name) and target.id in ("openapi_types", "attribute_map"):
                values[target.id] = ast.literal_eval(item.value)
        if len(values) == 2:
            found[node.name] = {values["attribute_map"][k]: t for k, t in values["openapi_types"].items()}
    return found


def main(wheel: str) -> None:
    match = re.search(r"kserve-([^-]+)-", Path(wheel).name)
    if match is None:
        raise SystemExit(f"{wheel}: not a kserve wheel")
    version = match.group(1)
    types: dict[str, dict[str, str]] = {}
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.startswith("kserve/models/") and name.endswith(".py"):
                types.update(class_fields(archive.read(name).decode()))
    keep, todo = {}, [ROOT]
    while todo:
        name = todo.pop()
        if name in keep or name not in types:
            continue
        keep[name] = types[name]
        for kind in types[name].values():
            todo += re.findall(r"[A-Z][A-Za-z0-9]+", kind)
    out = Path(__file__).resolve().parents[1] / "k8s" / "schemas" / f"kserve-{version}-inferenceservice.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "source": f"kserve {version} wheel from PyPI, kserve/models (generated from KServe's OpenAPI spec; "
        "Apache-2.0), extracted by scripts/vendor_kserve_schema.py",
        "root": ROOT,
        "types": dict(sorted(keep.items())),
    }
    out.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")
    print(f"{out}: {len(keep)} KServe types")


if __name__ == "__main__":
    main(sys.argv[1])
