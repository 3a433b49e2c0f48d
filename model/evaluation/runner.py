"""Run a model over a data set and score it: the one inference path of evaluation and ``predict``.

Images go through ``model.preprocess.preprocess`` and the network, detections through
``model.postprocess.PostProcessor`` and ``to_pixels``: there is no other decode code here. The
multi-scale test (``multiscale=True``) runs the same path at other square input sizes with anchors
from ``model.anchors.generate_anchors`` and merges the runs by box voting (``model.evaluation.multiscale``).
An exported artifact takes the network's place through ``model.evaluation.artifact.ArtifactNetwork``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, cast

import torch
from torch import Tensor, nn

from model.anchors import generate_anchors
from model.checkpoint import unwrap
from model.config import PostprocessConfig
from model.errors import UserError
from model.evaluation.artifact import ArtifactNetwork
from model.evaluation.multiscale import ScaleRule, flip_boxes, merge_by_voting, multiscale_schedule
from model.evaluation.voc import evaluate_detections
from model.network import RefineDet
from model.postprocess import PostProcessor, to_pixels
from model.preprocess import preprocess


class ImageDataset(Protocol):
    def __len__(self) -> int: ...
    def load_image(self, index: int) -> Tensor: ...


class _Images(torch.utils.data.Dataset):
    """Adapts ``dataset.load_image(i)`` (uint8 RGB [3, H, W]) to a DataLoader."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tensor:
        return self.dataset.load_image(index)


def network(model: nn.Module) -> RefineDet | ArtifactNetwork:
    """The RefineDet inside training wrappers, or an exported artifact standing in for it."""
    return model if isinstance(model, ArtifactNetwork) else unwrap(model)


class NetworkDetector:
    """The network + shared post-processing at any square input size (a multiple of 64).

    ``detector(images, size, flip)`` takes uint8 RGB images [3, H, W] on the model's device and returns
    per image dict(boxes Tensor[N, 4] pixel xyxy clipped to the image, scores [N], labels [N] in
    1..C-1), best first, on the CPU.
    """

    def __init__(self, model: nn.Module, postprocess: PostprocessConfig | None = None) -> None:
        self.model = model
        net = network(model)
        self.config = net.config
        self.postprocessor = PostProcessor(self.config, postprocess)
        self._anchors: dict[int, Tensor] = {self.config.input_size: cast(Tensor, net.anchors)}

    def anchors(self, size: int) -> Tensor:
        if size not in self._anchors:
            device = self._anchors[self.config.input_size].device
            self._anchors[size] = generate_anchors(self.config.replace(input_size=size)).to(device)
        return self._anchors[size]

    @torch.inference_mode()
    def __call__(
        self, images: Sequence[Tensor], size: int | None = None, flip: bool = False
    ) -> list[dict[str, Tensor]]:
        size = size or self.config.input_size
        batch = preprocess([im.flip(-1) if flip else im for im in images], size, self.config.normalization)
        detections = self.postprocessor(self.model(batch), self.anchors(size))
        results = []
        for i, image in enumerate(images):
            boxes, scores, labels = detections.image(i)
            if flip:
                boxes = flip_boxes(boxes)
            height, width = image.shape[-2:]
            results.append(
                {
                    "boxes": to_pixels(boxes, width, height).cpu(),
                    "scores": scores.cpu(),
                    "labels": labels.cpu(),
                }
            )
        return results

    def multiscale(self, images: Sequence[Tensor], rules: Sequence[ScaleRule]) -> list[dict[str, Tensor]]:
        """Every rule's scale with and without flip, size-filtered, merged per class by box voting."""
        runs: list[list[dict[str, Tensor]]] = [[] for _ in images]
        for rule in rules:
            for flip in (False, True):
                for per_image, det in zip(runs, self(images, rule.size, flip), strict=True):
                    keep = rule.keep(det["boxes"])
                    per_image.append({k: v[keep] for k, v in det.items()})
        return [merge_by_voting(r) for r in runs]


def predict_dataset(
    model: nn.Module,
    dataset: ImageDataset,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    postprocess: PostprocessConfig | None = None,
    multiscale: bool = False,
    progress: bool = True,
    scales: Sequence[ScaleRule] | None = None,
    num_workers: int = 0,
) -> list[dict[str, Tensor]]:
    """Detections for every image of ``dataset`` (anything with ``__len__`` and ``load_image(i)``).

    Returns per image dict(boxes Tensor[N, 4] pixel xyxy, scores [N], labels [N] in 1..C-1), CPU,
    best first. ``multiscale`` runs the paper's multi-scale + flip test (``scales`` overrides its
    schedule). The model is moved to ``device``, run in eval mode and left in the mode it came in.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    model.to(device)
    detector = NetworkDetector(model, postprocess)
    schedule = multiscale_schedule(detector.config.input_size) if multiscale else None
    rules = tuple(scales) if scales is not None else schedule
    loader = torch.utils.data.DataLoader(
        _Images(dataset), batch_size=batch_size, num_workers=num_workers, collate_fn=list
    )
    was_training = model.training
    model.eval()
    results: list[dict[str, Tensor]] = []
    try:
        for images in tqdm(loader, desc="detect", unit="batch", disable=not progress, leave=False):
            images = [im.to(device, non_blocking=True) for im in images]
            results += detector.multiscale(images, rules) if rules else detector(images)
    finally:
        model.train(was_training)
    return results


def _check_classes(model: nn.Module, dataset: Any) -> tuple[str, ...]:
    names = tuple(network(model).config.class_names)
    if tuple(dataset.class_names) != names:
        raise UserError(
            f"the data set's classes {tuple(dataset.class_names)} differ from the model's {names}; "
            "open the data set with the model's class_names"
        )
    return names


def evaluate_voc(
    model: nn.Module,
    dataset: Any,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    use_07_metric: bool = True,
    iou_threshold: float = 0.5,
    inclusive: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """VOC AP of ``model`` on a detection data set (``class_names``, ``load_image``, ``annotation``).

    Returns ``model.evaluation.voc.evaluate_detections``'s dict ("mAP", "per_class", ...) plus
    "num_images". ``kwargs`` go to ``predict_dataset`` (postprocess, multiscale, progress, ...).
    """
    names = _check_classes(model, dataset)
    predictions = predict_dataset(model, dataset, device=device, batch_size=batch_size, **kwargs)
    annotations = [dataset.annotation(i) for i in range(len(dataset))]
    result = evaluate_detections(predictions, annotations, names, iou_threshold, use_07_metric, inclusive)
    result["num_images"] = len(dataset)
    return result


def evaluate_coco(
    model: nn.Module, dataset: Any, device: str | torch.device = "cpu", batch_size: int = 8, **kwargs: Any
) -> dict[str, Any]:
    """COCO AP, AP50, AP75, APs, APm, APl of ``model`` through pycocotools' COCOeval.

    A data set with a ``coco`` attribute (``COCODetection``) is scored against that ground truth with
    its ``category_ids``; any other detection data set (e.g. VOC) is converted first (see
    ``model.evaluation.coco.coco_ground_truth``). ``kwargs`` go to ``predict_dataset``.
    """
    from model.evaluation.coco import evaluate_coco_detections

    _check_classes(model, dataset)
    predictions = predict_dataset(model, dataset, device=device, batch_size=batch_size, **kwargs)
    result = evaluate_coco_detections(predictions, dataset)
    result["num_images"] = len(dataset)
    return result
