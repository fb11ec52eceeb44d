"""CAM throughput: qrobust versus pytorch-grad-cam on the same model, layer, batch and targets.

Run: .venv/bin/python benchmarks/cam_speed.py   (ResNet18, random weights: speed does not depend on them)
Both are timed interleaved, median of the rounds; pytorch-grad-cam is the PyPI `grad-cam` package.
"""
from __future__ import annotations

import statistics
import time

import torch
import torchvision
from pytorch_grad_cam import EigenCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from qrobust.explain.cam import compute_cams


def main(batch: int = 16, rounds: int = 5) -> list[dict]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.rand(batch, 3, 224, 224)
    with torch.inference_mode():
        targets = model(x).argmax(1)
    theirs_targets = [ClassifierOutputTarget(int(t)) for t in targets]
    rows = []
    for name, cls in (("gradcampp", GradCAMPlusPlus), ("eigencam", EigenCAM)):
        theirs_cam = cls(model=model, target_layers=[model.layer4])
        runs = {"qrobust": lambda: compute_cams(model, x, "layer4", [name], targets=targets),
                "pytorch-grad-cam": lambda: theirs_cam(input_tensor=x, targets=theirs_targets)}
        times = {k: [] for k in runs}
        for _ in range(rounds + 1):
            for k, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - start)
        med = {k: statistics.median(v[1:]) for k, v in times.items()}
        rows.append({"method": name, "batch": batch, "qrobust_s": med["qrobust"], "grad_cam_s": med["pytorch-grad-cam"],
                     "speedup": med["pytorch-grad-cam"] / med["qrobust"]})
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(rounds):
            model(x)
        forward = (time.perf_counter() - start) / rounds
    for r in rows:
        r["forward_s"] = forward
    return rows


if __name__ == "__main__":
    for r in main():
        print(f"{r['method']:10s} batch {r['batch']}: qrobust {r['qrobust_s']:.3f} s, pytorch-grad-cam "
              f"{r['grad_cam_s']:.3f} s, qrobust is {r['speedup']:.2f}x as fast; one inference forward "
              f"{r['forward_s']:.3f} s")
