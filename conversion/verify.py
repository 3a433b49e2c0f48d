"""Does an exported artifact compute what the checkpoint computes?

``verify_artifact`` runs the PyTorch model and an artifact runner on the same preprocessed batches,
then reports (1) max / mean absolute difference per output tensor (the four raw heads, or
boxes_xyxy / scores for a "decoded" graph) and (2) detection agreement after the shared
post-processing (``model.postprocess``) on both sides: detections are matched greedily per image
and class at IoU >= 0.99 (0.9 for INT8), with the score difference of every matched pair. A detection that finds
no partner but whose score lies within the score tolerance of the other side's selection boundary
for that image (``score_threshold``, or the lowest kept score when ``keep_top_k`` is full) is
counted as "borderline": a numerically tiny change can legitimately move it across the cut.

Tolerances depend on the artifact's precision (``TOLERANCES``); ``VerifyReport.failures`` lists
what is beyond them and the CLI exits 1 when any is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from model.errors import UserError
from model.network import RefineDet, RefineDetOutput
from model.postprocess import Detections, PostProcessor
from model.runtime.base import ArtifactRunner

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Tolerance:
    raw_max_abs: float  # max |difference| of any output element
    raw_mean_abs: float  # mean |difference| per output
    score_abs: float  # max |score difference| of matched detections (also the borderline margin)
    min_agreement: float  # matched / non-borderline detections, both directions
    match_iou: float = 0.99  # a detection matches the other side's at this IoU (same class)


# fp32 is meant to be identical up to summation order. fp16 is a starting point never checked against
# a real engine (no TensorRT here): detection agreement is what matters. int8 comes from ONNX Runtime
# INT8 (`refinedet export onnx --int8`) of the shipped BCCD model, on 32 BCCD test and 32 val images:
# worst raw max abs diff 0.69, mean 0.029, matched score diff 0.09, agreement 0.96 at IoU 0.9 (INT8
# moves boxes by about a pixel: at IoU 0.99 only 594 of 1916 detections matched). The limits leave
# 1.45-1.75x of margin; TensorRT INT8 engines have not been measured against them. bf16 is OpenVINO
# running the FP32 ONNX in BF16 (its default on a CPU with BF16): on the shipped BCCD model, 8 synthetic
# smears and 24 BCCD test images, worst raw max abs diff 0.15, mean 0.012, matched score diff 0.011, every
# non-borderline detection matched at IoU 0.9 (BF16 keeps 8 bits of mantissa: boxes move by a fraction
# of a pixel). OpenVINO on the INT8 QDQ model reports int8 and stays within the int8 limits (worst max
# 0.99, mean 0.042, like ONNX Runtime's 0.98 / 0.043).
TOLERANCES = {
    "bf16": Tolerance(raw_max_abs=0.3, raw_mean_abs=3e-2, score_abs=5e-2, min_agreement=0.95, match_iou=0.9),
    "fp32": Tolerance(raw_max_abs=1e-4, raw_mean_abs=1e-5, score_abs=1e-4, min_agreement=1.0),
    "fp16": Tolerance(raw_max_abs=5e-2, raw_mean_abs=5e-3, score_abs=2e-2, min_agreement=0.95),
    "int8": Tolerance(raw_max_abs=1.0, raw_mean_abs=5e-2, score_abs=0.15, min_agreement=0.9, match_iou=0.9),
}


@dataclass
class OutputDiff:
    name: str
    max_abs: float
    mean_abs: float


@dataclass
class Agreement:
    reference: int = 0  # detections from PyTorch
    candidate: int = 0  # detections from the artifact
    matched: int = 0
    borderline_reference: int = 0  # unmatched PyTorch detections near the selection boundary
    borderline_candidate: int = 0
    max_score_diff: float = 0.0
    sum_score_diff: float = 0.0

    @property
    def mean_score_diff(self) -> float:
        return self.sum_score_diff / self.matched if self.matched else 0.0

    @property
    def rate(self) -> float:
        """matched / non-borderline detections, the worse of the two directions (1.0 when none)."""
        ref = self.reference - self.borderline_reference
        cand = self.candidate - self.borderline_candidate
        return min(self.matched / ref if ref > 0 else 1.0, self.matched / cand if cand > 0 else 1.0)


@dataclass
class VerifyReport:
    artifact: str
    precision: str
    images: int
    tolerance: Tolerance
    outputs: list[OutputDiff] = field(default_factory=list)
    agreement: Agreement = field(default_factory=Agreement)

    def failures(self) -> list[str]:
        tol, out = self.tolerance, []
        for d in self.outputs:
            if not d.max_abs <= tol.raw_max_abs:  # `not <=` also catches NaN
                out.append(f"{d.name}: max abs diff {d.max_abs:.3g} > {tol.raw_max_abs:g}")
            if not d.mean_abs <= tol.raw_mean_abs:
                out.append(f"{d.name}: mean abs diff {d.mean_abs:.3g} > {tol.raw_mean_abs:g}")
        a = self.agreement
        if a.rate < tol.min_agreement:
            out.append(f"detection agreement {a.rate:.4f} < {tol.min_agreement:g}")
        if a.max_score_diff > tol.score_abs:
            out.append(f"matched detection score diff {a.max_score_diff:.3g} > {tol.score_abs:g}")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    def to_dict(self) -> dict:
        agreement = {
            **asdict(self.agreement),
            "rate": self.agreement.rate,
            "mean_score_diff": self.agreement.mean_score_diff,
        }
        agreement.pop("sum_score_diff")
        return {
            "artifact": self.artifact,
            "precision": self.precision,
            "images": self.images,
            "tolerance": asdict(self.tolerance),
            "outputs": [asdict(d) for d in self.outputs],
            "agreement": agreement,
            "failures": self.failures(),
            "passed": self.passed,
        }

    def format(self) -> str:
        lines = [f"{self.artifact} ({self.precision}) vs PyTorch on {self.images} images"]
        lines += [
            f"  {d.name:12s} max abs diff {d.max_abs:.3g}  mean abs diff {d.mean_abs:.3g}"
            for d in self.outputs
        ]
        a = self.agreement
        lines.append(
            f"  detections   pytorch {a.reference}  artifact {a.candidate}  matched {a.matched} "
            f"(IoU >= {self.tolerance.match_iou:g}, same class)  borderline {a.borderline_reference}/{a.borderline_candidate}  "
            f"agreement {a.rate:.4f}  score diff max {a.max_score_diff:.3g} mean {a.mean_score_diff:.3g}"
        )
        failures = self.failures()
        lines.append("  PASS" if not failures else "  FAIL: " + "; ".join(failures))
        return "\n".join(lines)


def _boundary(scores: Tensor, keep_top_k: int, score_threshold: float) -> float:
    valid = scores[scores > 0]
    return float(valid.min()) if valid.numel() >= keep_top_k else score_threshold


def match_detections(
    reference: Detections,
    candidate: Detections,
    keep_top_k: int,
    score_threshold: float,
    score_margin: float,
    iou_threshold: float = 0.99,
) -> Agreement:
    """Greedy per-image, per-class matching of two Detections at ``iou_threshold``."""
    from model.postprocess import box_iou

    agreement = Agreement()
    for i in range(reference.scores.shape[0]):
        r_boxes, r_scores, r_labels = (t.cpu() for t in reference.image(i))
        c_boxes, c_scores, c_labels = (t.cpu() for t in candidate.image(i))
        agreement.reference += len(r_scores)
        agreement.candidate += len(c_scores)
        iou = (
            box_iou(r_boxes, c_boxes)
            if len(r_scores) and len(c_scores)
            else torch.zeros(len(r_scores), len(c_scores))
        )
        iou = iou.masked_fill(r_labels[:, None] != c_labels[None, :], 0.0)
        r_used = torch.zeros(len(r_scores), dtype=torch.bool)
        c_used = torch.zeros(len(c_scores), dtype=torch.bool)
        for r in range(len(r_scores)):  # reference is sorted best first
            if not len(c_scores):
                break
            cand_iou = iou[r].masked_fill(c_used, -1.0)
            c = int(cand_iou.argmax())
            if cand_iou[c] >= iou_threshold:
                r_used[r] = c_used[c] = True
                diff = abs(float(r_scores[r] - c_scores[c]))
                agreement.matched += 1
                agreement.max_score_diff = max(agreement.max_score_diff, diff)
                agreement.sum_score_diff += diff
        # A PyTorch detection the artifact lacks is excused if it would barely have made the artifact's
        # cut (and vice versa): its score is within the margin of the other side's boundary.
        r_cut = _boundary(reference.scores[i].cpu(), keep_top_k, score_threshold) + score_margin
        c_cut = _boundary(candidate.scores[i].cpu(), keep_top_k, score_threshold) + score_margin
        agreement.borderline_reference += int((r_scores[~r_used] <= c_cut).sum())
        agreement.borderline_candidate += int((c_scores[~c_used] <= r_cut).sum())
    return agreement


def image_files(directory: str | Path, max_images: int | None = None) -> list[Path]:
    directory = Path(directory)
    if max_images is not None and max_images < 1:
        raise UserError(f"--max-images must be at least 1, got {max_images}")
    if not directory.is_dir():
        raise UserError(f"--images must be a directory of images, got {directory}")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {directory}")
    return files if max_images is None else files[:max_images]


def image_batches(files: Sequence[Path], size: int, norm, batch_size: int) -> Iterable[Tensor]:
    """Decode, resize and normalise files with the shared contract (``model.preprocess``), in batches."""
    from model.preprocess import preprocess

    for start in range(0, len(files), batch_size):
        yield preprocess([_decode(f) for f in files[start : start + batch_size]], size, norm)


def _decode(path: Path) -> Tensor:
    """The image at ``path`` (uint8 RGB [3, H, W]); a ``UserError`` naming it when it cannot be decoded."""
    from model.preprocess import load_image

    try:
        return load_image(path)
    except (OSError, ValueError) as exc:  # PIL: UnidentifiedImageError (an OSError), truncated data
        raise UserError(f"{path} is not a readable image ({exc})") from None


@torch.no_grad()
def verify_artifact(
    model: RefineDet,
    runner: ArtifactRunner,
    batches: Iterable[Tensor],
    artifact: str = "artifact",
    tolerance: Tolerance | None = None,
) -> VerifyReport:
    """Run ``model`` (moved to the runner's device) and ``runner`` on every batch; compare."""
    model = model.to(runner.device).eval()
    pp = runner.config.postprocess
    postprocessor = PostProcessor(runner.config)
    anchors: Tensor = model.anchors  # type: ignore[assignment]
    tol = tolerance or TOLERANCES[runner.precision]
    report = VerifyReport(artifact, runner.precision, 0, tol)
    sums: dict[str, list[float]] = {}
    for images in batches:
        images = images.to(runner.device)
        reference: RefineDetOutput = model(images)
        candidate = runner(images)
        ref_tensors = postprocessor.to_stage_of(reference, candidate, anchors)  # the candidate's stage
        for name, r, c in zip(candidate._fields, ref_tensors, candidate, strict=True):
            diff = (r.float() - c.float()).abs()
            s = sums.setdefault(name, [0.0, 0.0, 0])  # max, sum, count
            m = float(diff.max())
            if math.isnan(m) or m > s[0]:  # a NaN sticks (nothing compares greater) and fails the check
                s[0] = m
            s[1] += float(diff.sum())
            s[2] += diff.numel()
        ref_det = postprocessor(reference, anchors)
        cand_det = postprocessor(candidate, runner.anchors)
        a = match_detections(
            ref_det, cand_det, pp.keep_top_k, pp.score_threshold, tol.score_abs, tol.match_iou
        )
        _accumulate(report.agreement, a)
        report.images += images.shape[0]
    report.outputs = [OutputDiff(n, s[0], s[1] / max(s[2], 1)) for n, s in sums.items()]
    if report.images == 0:
        raise UserError("no images to verify with")
    return report


def _accumulate(total: Agreement, part: Agreement) -> None:
    for name in (
        "reference",
        "candidate",
        "matched",
        "borderline_reference",
        "borderline_candidate",
        "sum_score_diff",
    ):
        setattr(total, name, getattr(total, name) + getattr(part, name))
    total.max_score_diff = max(total.max_score_diff, part.max_score_diff)
