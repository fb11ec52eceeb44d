"""Explanation quality (seed 002): deletion / insertion AUC and weakly supervised localization IoU.

Deletion removes (sets to 0) the top-k% pixels ranked by the CAM, insertion pastes them onto a blurred
copy, for k = 0, 1, ..., 100 %; the score is the softmax probability of the target class, and the AUC
uses the trapezoid rule over k / 100. A good map makes deletion fall fast (low AUC) and insertion rise
fast (high AUC). All steps of an image run as batches, never one forward per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qrobust.data.perturbations import Context, gaussian_blur
from qrobust.errors import invalid
from qrobust.explain.cam import compute_cams
from qrobust.metrics.saliency import activation_stats
from qrobust.metrics.stats import BootstrapMean, Estimate, poisson_weights
from qrobust.placement import feed


@dataclass(frozen=True)
class DeletionInsertion:
    deletion_auc: torch.Tensor  # (N,)
    insertion_auc: torch.Tensor  # (N,)
    deletion_curves: torch.Tensor  # (N, steps + 1)
    insertion_curves: torch.Tensor  # (N, steps + 1)


def insertion_blur_sigma(height: int, width: int) -> float:
    """RISE blurs 224 px images with sigma 5; scale it with the image, at least 1 px."""
    return max(1.0, 5.0 * min(height, width) / 224)


def _step_masks(cam_map: torch.Tensor, steps: int) -> torch.Tensor:
    """(steps + 1, H, W) masks of the top-k% pixels by the map, k = 0..100 in ``steps`` steps."""
    h, w = cam_map.shape
    order = cam_map.flatten().argsort(descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.round(torch.linspace(0, h * w, steps + 1, device=cam_map.device)).long()
    return (rank[None, :] < counts[:, None]).reshape(steps + 1, h, w)


def deletion_insertion(model, normalize, images: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor,
                       steps: int = 100, batch_size: int = 256) -> DeletionInsertion:
    """Deletion and insertion curves and AUCs of ``maps`` (N, H, W) for ``images`` (N, C, H, W) pixels."""
    if images.dim() != 4 or maps.shape != (images.shape[0], *images.shape[-2:]):
        raise invalid("maps", tuple(maps.shape), f"expected (N, H, W) matching images {tuple(images.shape)}")
    if not isinstance(steps, int) or steps < 1:
        raise invalid("steps", steps, "must be a positive integer")
    blurred = gaussian_blur(images, insertion_blur_sigma(*images.shape[-2:]), Context(torch.arange(len(images))))
    curves = {"deletion": [], "insertion": []}
    with torch.inference_mode():
        for img, base, cam_map, target in zip(images, blurred, maps, targets.tolist()):
            masks = _step_masks(cam_map, steps)[:, None].to(img.dtype)
            variants = {"deletion": img * (1 - masks), "insertion": base + masks * (img - base)}
            for kind, batch in variants.items():
                probs = torch.cat([torch.softmax(feed(model, normalize(chunk)), dim=1)[:, target].cpu()
                                   for chunk in batch.split(batch_size)])
                curves[kind].append(probs.float().cpu())
    deletion, insertion = torch.stack(curves["deletion"]), torch.stack(curves["insertion"])
    dx = 1.0 / steps
    return DeletionInsertion(torch.trapezoid(deletion, dx=dx, dim=1), torch.trapezoid(insertion, dx=dx, dim=1),
                             deletion, insertion)


def wsol_box(cam_map: torch.Tensor, threshold: float = 0.5) -> tuple[int, int, int, int] | None:
    """Box (x0, y0, x1, y1), end exclusive, of the largest 8-connected region with map >= threshold."""
    from scipy import ndimage

    if not 0 <= threshold <= 1:
        raise invalid("threshold", threshold, "must be in [0, 1] (maps are min-max scaled)")
    mask = (cam_map >= threshold).cpu().numpy()
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    ys, xs = np.nonzero(labels == 1 + int(np.argmax(sizes)))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def box_iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes; 0 when either is missing."""
    if a is None or b is None:
        return 0.0
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def wsol_iou(maps: torch.Tensor, boxes: torch.Tensor | None, threshold: float = 0.5) -> torch.Tensor | None:
    """Per-image IoU of the CAM box with the ground-truth box, or None when the dataset has no boxes."""
    if boxes is None:
        return None
    return torch.tensor([box_iou(wsol_box(m, threshold), tuple(int(v) for v in b.tolist()))
                         for m, b in zip(maps, boxes)])


def explanation_quality(pair, data, method: str, *, seed: int = 0, replicates: int = 1000, steps: int = 100,
                        batch_size: int = 32, wsol_threshold: float = 0.5) -> dict:
    """Seed 002's explanation comparison of a pair on clean images, as Estimates by metric name.

    Each model is explained with its own CAM of the FP32 top-1 class: ``deletion_auc_delta`` is the
    quantized model's deletion AUC minus FP32's and ``insertion_auc_delta`` FP32's insertion AUC minus the
    quantized one's (positive = the quantized explanation is worse, like every delta here);
    ``activation_dice`` compares the histograms of the target layer's channel-mean activation (seed 002's
    "average activation"; with few channels the quantized grid shows through and the Dice drops, so it
    is not gated by default); ``wsol_iou_delta`` is FP32's
    box IoU minus the quantized one's and is absent when the dataset has no boxes.
    """
    per_image = {"deletion_auc_delta": [], "insertion_auc_delta": [], "wsol_iou_delta": []}
    groups, acts_fp, acts_q, has_boxes = [], [], [], True
    norm = pair.preprocess.normalize
    for batch in data.batches(batch_size):
        x = norm(batch.images)
        fp = compute_cams(pair.fp32, x, pair.target_layer, [method])
        q = compute_cams(pair.quantized, x, pair.quantized_target_layer, [method], targets=fp.targets)
        fp_maps, q_maps = fp.maps[method][0], q.maps[method][0]
        fp_di = deletion_insertion(pair.fp32, norm, batch.images, fp_maps, fp.targets, steps, batch_size * 8)
        q_di = deletion_insertion(pair.quantized, norm, batch.images, q_maps, fp.targets, steps, batch_size * 8)
        per_image["deletion_auc_delta"].append(q_di.deletion_auc - fp_di.deletion_auc)
        per_image["insertion_auc_delta"].append(fp_di.insertion_auc - q_di.insertion_auc)
        if batch.boxes is None:
            has_boxes = False
        else:
            per_image["wsol_iou_delta"].append(wsol_iou(fp_maps, batch.boxes, wsol_threshold)
                                               - wsol_iou(q_maps, batch.boxes, wsol_threshold))
        groups.append(batch.groups)
        acts_fp.append(fp.activations)
        acts_q.append(q.activations)
    groups = torch.cat(groups)
    weights = poisson_weights(seed, groups, replicates)
    out = {}
    for name, values in per_image.items():
        if name == "wsol_iou_delta" and not has_boxes:
            continue
        mean = BootstrapMean(replicates)
        mean.update(torch.cat(values), weights)
        out[name] = mean.estimate({"method": method, "steps": steps})
    if acts_fp[0] is None:  # a layer-free method (occlusion) looks at no activation
        return out
    # seed 002 histograms the average activation: the channel mean at every position of every image
    stats = activation_stats(torch.cat(acts_fp).mean(dim=1), torch.cat(acts_q).mean(dim=1))
    stats.pop("histograms")
    out["activation_dice"] = Estimate(stats.pop("dice"), None, len(groups), {"layer": pair.target_layer, **stats})
    return out
