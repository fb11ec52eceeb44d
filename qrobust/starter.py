"""``qrobust init``: a commented starter thresholds file for the user's own pair."""
from __future__ import annotations

import sys
from pathlib import Path

STARTER = """\
# qrobust thresholds file: the gate for your own model. Paths are relative to this file.
# Run it with:  qrobust run {name}      (or: pytest --pyargs qrobust.suites --qrobust-thresholds {name})
# Every key is documented in the README ("thresholds.yaml"); `qrobust template` prints the built-in gate,
# whose tolerances each carry their source.

decision: point        # point | strict (whole 95% interval must pass) | lenient | familywise (<= 5% false alarms per pair)
seed: 0

pairs:
  my-model-int8:
    arch: resnet18                  # any torchvision classification architecture, or builder: "pkg.mod:function"
    weights: weights/model.pt       # a state dict (.pt/.pth, loaded as tensors only) or .safetensors
    num_classes: 1000
    preset: int8-x86                # `python -c "import qrobust; print(list(qrobust.PRESETS))"` lists them
    calibration: {{dataset: my-calib, samples: 256}}     # never the gated split
    preprocess: {{resolution: [224, 224], mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}
    dataset: my-val

datasets:
  my-val:   {{folder: data/val, resolution: [224, 224]}}     # one subfolder per class
  my-calib: {{folder: data/calib, resolution: [224, 224]}}

# Without a perturbations: section the gate sweeps seed 004's four families (awgn, brownian, vertical and
# horizontal occlusion) at their default levels; without defaults: it applies the documented defaults
# (top1_delta 0.01, top5_delta 0.01, f1_delta 0.01, agreement 0.98, kl_mean 0.02, kl_p95 0.05,
# quantizer_violations 0).
defaults:
  top1_delta: 0.01     # NNCF / Intel Neural Compressor default accuracy-drop budget
  agreement: 0.98
  kl_mean: 0.02        # seed 004: clean KL(FP32 || INT8) of 0.008-0.018 on ImageNet networks
  cam_sim: 0.80        # seed 001: lowest int8-vs-FP32 Grad-CAM++ SIM 0.81 (needs a CAM layer)

gate:
  my-model-int8: {{}}
"""


def write_starter(path: Path, *, force: bool = False) -> int:
    if path.exists() and not force:
        print(f"qrobust init: {path} exists (pass --force to replace it)", file=sys.stderr)
        return 1
    path.write_text(STARTER.format(name=path.name), encoding="utf-8")
    print(f"wrote {path}: edit the pair, weights and folders, then run: qrobust run {path}")
    return 0
