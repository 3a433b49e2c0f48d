"""VOC AP against an independent loop implementation written from the devkit's definition."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from model.evaluation.voc import evaluate_detections, iou_matrix, voc_ap

# --- reference: the devkit's VOCevaldet / VOCap written as plain loops ------------------------------


def ref_iou(a, b):
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return inter / union


def ref_ap(rec, prec, use_07):
    if use_07:
        ap = 0.0
        for k in range(11):
            t = k / 10
            p = 0.0
            for r, q in zip(rec, prec, strict=True):
                if r >= t - 1e-12 and q > p:
                    p = q
            ap += p / 11
        return ap
    mrec = [0.0, *rec, 1.0]
    mpre = [0.0, *prec, 0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


def ref_eval(dets, gts, num_classes, use_07, thr=0.5):
    aps = {}
    for c in range(1, num_classes + 1):
        npos = sum(
            1 for g in gts for lab, d in zip(g["labels"], g["difficult"], strict=True) if lab == c and not d
        )
        found = [{j: False for j, lab in enumerate(g["labels"]) if lab == c} for g in gts]
        cand = [
            (s, img, b)
            for img, d in enumerate(dets)
            for b, s, lab in zip(d["boxes"], d["scores"], d["labels"], strict=True)
            if lab == c
        ]
        cand.sort(key=lambda x: -x[0])  # Python's sort is stable
        tp, fp = [], []
        for _, img, box in cand:
            best, jbest = -1.0, None
            for j in found[img]:
                o = ref_iou(box, gts[img]["boxes"][j])
                if o > best:
                    best, jbest = o, j
            if jbest is not None and best > thr:
                if gts[img]["difficult"][jbest]:
                    continue
                if not found[img][jbest]:
                    found[img][jbest] = True
                    tp.append(1), fp.append(0)
                else:
                    tp.append(0), fp.append(1)
            else:
                tp.append(0), fp.append(1)
        if npos == 0:
            aps[c] = math.nan
            continue
        rec, prec, ctp, cfp = [], [], 0, 0
        for t, f in zip(tp, fp, strict=True):
            ctp, cfp = ctp + t, cfp + f
            rec.append(ctp / npos)
            prec.append(ctp / (ctp + cfp))
        aps[c] = ref_ap(rec, prec, use_07)
    return aps


# --- hand-built and random cases --------------------------------------------------------------------


def hand_built():
    """3 images, 4 classes. Class 1: TP, duplicate, a hit on a difficult box, a detection whose best
    ground truth is taken although another (IoU 0.86) is free, misses. Class 2: only difficult ground truths.
    Class 3: no ground truth at all (but detections). Class 4: ground truths, no detections."""
    gts = [
        {
            "boxes": [[10, 10, 50, 50], [14, 10, 54, 50], [10, 60, 40, 90]],
            "labels": [1, 1, 1],
            "difficult": [False, False, True],
        },
        {"boxes": [[0, 0, 30, 30], [35, 0, 65, 30]], "labels": [1, 2], "difficult": [False, True]},
        {"boxes": [[20, 20, 70, 70]], "labels": [4], "difficult": [False]},
    ]
    dets = [
        {
            "boxes": [
                [11, 11, 50, 50],
                [10, 10, 49, 51],
                [11, 60, 40, 90],
                [11, 10, 51, 50],
                [200, 200, 220, 220],
            ],
            "scores": [0.95, 0.9, 0.85, 0.6, 0.3],
            "labels": [1, 1, 1, 1, 1],
        },
        {
            "boxes": [[1, 0, 30, 30], [35, 0, 65, 30], [0, 0, 10, 10]],
            "scores": [0.7, 0.8, 0.5],
            "labels": [1, 2, 3],
        },
        {"boxes": [[0, 0, 5, 5]], "scores": [0.2], "labels": [1]},
    ]
    return dets, gts


def random_case(seed, n_images=12, num_classes=3):
    rnd = random.Random(seed)
    gts, dets = [], []
    scores = rnd.sample(range(1, 100000), 400)  # distinct scores: no tie-order ambiguity
    for _ in range(n_images):
        g = {"boxes": [], "labels": [], "difficult": []}
        for _ in range(rnd.randint(0, 6)):
            x, y, w, h = rnd.uniform(0, 200), rnd.uniform(0, 200), rnd.uniform(5, 80), rnd.uniform(5, 80)
            g["boxes"].append([x, y, x + w, y + h])
            g["labels"].append(rnd.randint(1, num_classes))
            g["difficult"].append(rnd.random() < 0.2)
        d = {"boxes": [], "scores": [], "labels": []}
        for box, lab in zip(g["boxes"], g["labels"], strict=True):
            for _ in range(rnd.choice([0, 1, 1, 2, 3])):  # misses, hits and duplicates
                j = [v + rnd.uniform(-8, 8) for v in box]
                d["boxes"].append([min(j[0], j[2] - 1), min(j[1], j[3] - 1), j[2], j[3]])
                d["labels"].append(lab if rnd.random() < 0.85 else rnd.randint(1, num_classes))
        for _ in range(rnd.randint(0, 4)):  # background false positives
            x, y = rnd.uniform(0, 200), rnd.uniform(0, 200)
            d["boxes"].append([x, y, x + rnd.uniform(5, 60), y + rnd.uniform(5, 60)])
            d["labels"].append(rnd.randint(1, num_classes))
        d["scores"] = [scores.pop() / 100000 for _ in d["labels"]]
        gts.append(g)
        dets.append(d)
    return dets, gts


def as_arrays(dets, gts):
    d = [
        {
            "boxes": np.asarray(x["boxes"], float).reshape(-1, 4),
            "scores": np.asarray(x["scores"]),
            "labels": np.asarray(x["labels"], int),
        }
        for x in dets
    ]
    g = [
        {
            "boxes": np.asarray(x["boxes"], float).reshape(-1, 4),
            "labels": np.asarray(x["labels"], int),
            "difficult": np.asarray(x["difficult"], bool),
        }
        for x in gts
    ]
    return d, g


def assert_matches_reference(dets, gts, num_classes):
    names = [f"c{i}" for i in range(1, num_classes + 1)]
    for use_07 in (True, False):
        ours = evaluate_detections(*as_arrays(dets, gts), names, use_07_metric=use_07)
        ref = ref_eval(dets, gts, num_classes, use_07)
        for c, name in enumerate(names, start=1):
            if math.isnan(ref[c]):
                assert math.isnan(ours["per_class"][name])
            else:
                assert ours["per_class"][name] == pytest.approx(ref[c], abs=1e-4)
        defined = [v for v in ref.values() if not math.isnan(v)]
        assert ours["mAP"] == pytest.approx(sum(defined) / len(defined), abs=1e-4)


def test_hand_built_case_matches_reference():
    assert_matches_reference(*hand_built(), num_classes=4)


@pytest.mark.parametrize("seed", range(8))
def test_random_cases_match_reference(seed):
    assert_matches_reference(*random_case(seed), num_classes=3)


def test_hand_built_values_and_semantics():
    dets, gts = hand_built()
    names = ["c1", "c2", "c3", "c4"]
    r07 = evaluate_detections(*as_arrays(dets, gts), names, use_07_metric=True)
    # class 1, descending score: 0.95 TP, 0.9 duplicate FP, 0.85 difficult (ignored), 0.7 TP (image 1),
    # 0.6 FP (best gt is taken), 0.3 FP, 0.2 FP. 3 positives.
    assert r07["num_positives"] == {"c1": 3, "c2": 0, "c3": 0, "c4": 1}
    assert r07["num_detections"]["c1"] == 6  # the detection on the difficult box is not counted
    np.testing.assert_allclose(r07["pr_curves"]["c1"]["recall"], [1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(r07["pr_curves"]["c1"]["precision"], [1, 1 / 2, 2 / 3, 2 / 4, 2 / 5, 2 / 6])
    assert r07["per_class"]["c1"] == pytest.approx(4 / 11 * 1 + 3 / 11 * 2 / 3)
    r12 = evaluate_detections(*as_arrays(dets, gts), names, use_07_metric=False)
    assert r12["per_class"]["c1"] == pytest.approx(1 / 3 * 1 + 1 / 3 * 2 / 3)
    for r in (r07, r12):
        assert math.isnan(r["per_class"]["c2"]) and math.isnan(r["per_class"]["c3"])  # no positives
        assert r["per_class"]["c4"] == 0.0  # positives, no detections
        assert r["mAP"] == pytest.approx((r["per_class"]["c1"] + 0.0) / 2)


def test_voc_ap_known_curves():
    rec, prec = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    assert voc_ap(rec, prec, use_07_metric=False) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert voc_ap(np.zeros(0), np.zeros(0), True) == 0.0
    assert voc_ap(np.zeros(0), np.zeros(0), False) == 0.0
    assert voc_ap(np.array([1.0]), np.array([1.0]), False) == 1.0


def test_perfect_detections_give_ap_one():
    gts = [{"boxes": [[0, 0, 10, 10], [20, 20, 40, 40]], "labels": [1, 2], "difficult": [False, False]}]
    dets = [{"boxes": [[0, 0, 10, 10], [20, 20, 40, 40]], "scores": [0.9, 0.8], "labels": [1, 2]}]
    for use_07 in (True, False):
        assert evaluate_detections(*as_arrays(dets, gts), ["x", "y"], use_07_metric=use_07)["mAP"] == 1.0


def test_iou_inclusive_convention():
    a, b = np.array([[0.0, 0.0, 9.0, 9.0]]), np.array([[0.0, 0.0, 9.0, 4.0]])
    assert iou_matrix(a, b, inclusive=True)[0, 0] == pytest.approx(50 / 100)
    assert iou_matrix(a, b, inclusive=False)[0, 0] == pytest.approx(36 / 81)


def test_bad_labels_and_lengths_raise():
    dets, gts = as_arrays(*hand_built())
    with pytest.raises(ValueError, match="labels must lie"):
        evaluate_detections(dets, gts, ["c1", "c2"])  # class 3/4 labels do not exist
    with pytest.raises(ValueError, match="detection entries"):
        evaluate_detections(dets[:2], gts, ["c1", "c2", "c3", "c4"])


def test_accepts_tensors_and_missing_difficult():
    import torch

    gts = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])}]
    dets = [
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    ]
    result = evaluate_detections(dets, gts, ["x"])
    assert result["per_class"]["x"] == 0.0 and result["num_positives"]["x"] == 1
