"""The gate at scale: a generated folder of N photos-sized images, one real-size pair, the default families.

Reports, for the same images: the plain throughput of the FP32 model and of its int8 twin (batches already
in memory, a tight loop), and the gate's throughput (`qrobust run`, serial and with `-n W` workers):
images evaluated per second over all its cases, each case running both models on every image. On a
machine with CUDA it also runs the gate with `--qrobust-device cuda` (FP32 on the GPU, int8 on the CPU).

Run: .venv/bin/python benchmarks/scale.py [N] [WORKERS ...]   (default: 256 images, workers 2)
"""
from __future__ import annotations

import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

from gate_run import gate_report  # noqa: E402

PAIR = """\
pairs:
  scale-resnet18:
    arch: resnet18
    weights: random                 # throughput only: the verdicts of a random model mean nothing
    num_classes: 1000
    preset: int8-x86
    calibration: {dataset: images, samples: 32}
    preprocess: {resolution: [224, 224], mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
    dataset: images
datasets:
  images: {folder: images, resolution: [224, 224], workers: 2}
decision: point
replicates: 200
perturbations:                      # the default families, at level 0 and one level each: 5 evaluation units
  awgn: {levels: [0, 0.1]}
  brownian: {levels: [0, 0.1]}
  occlusion_vertical: {levels: [0, 2]}
  occlusion_horizontal: {levels: [0, 2]}
defaults: {kl_mean: 1.0}             # a check the random twin passes: the run must end green to count as a time
gate:
  scale-resnet18: {}
"""
UNITS = 5


def make_folder(root: Path, n: int) -> None:
    """N JPEG images of 256-360 px sides in 10 class folders (seeded)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / "images" / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = (int(v) for v in rng.integers(256, 361, size=2))
        base = rng.random((h // 8 + 1, w // 8 + 1, 3)) * 255
        image = np.kron(base, np.ones((8, 8, 1)))[:h, :w].astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i}.jpg", quality=90)


def plain_throughput(root: Path, n: int) -> dict:
    """Images per second of the FP32 model and of the int8 twin on the same preprocessed batches."""
    import torch

    from qrobust.data.folders import ImageReader, folder_dataset
    from qrobust.models.archs import build_arch
    from qrobust.quant import get_preset, quantize_model

    pre_mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    pre_std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    data = folder_dataset("images", root / "images", ImageReader((224, 224)), workers=2)
    batches = [(b.images - pre_mean) / pre_std for b in data.batches(8)]
    fp32 = build_arch("resnet18", 1000, "random")
    twin = quantize_model(fp32, get_preset("int8-x86"), batches[:4])
    out = {}
    for name, model in (("fp32", fp32), ("int8", twin)):
        with torch.inference_mode():
            model(batches[0])
            start = time.perf_counter()
            for x in batches:
                model(x)
        out[name] = n / (time.perf_counter() - start)
    return out


def gate(root: Path, workers: int, device: str = "cpu") -> float:
    """Wall seconds of `qrobust run` on the folder (the pair's build included: nothing built is reusable
    across processes). A run whose report holds a failure or an error is not a time: it stops here."""
    args = ["scale.yaml", "--qrobust-device", device] + (["-n", str(workers)] if workers > 1 else [])
    start = time.perf_counter()
    report, run = gate_report(args, cwd=root, label=f"the {device} gate with {workers} worker(s)")
    elapsed = time.perf_counter() - start
    summary = report["summary"]
    if run.returncode != 0 or summary["fail"] or summary.get("error") or not summary["pass"]:
        raise SystemExit(f"the {device} gate with {workers} worker(s) did not pass (exit {run.returncode}, {summary}): "
                         f"not a time\n{run.stdout[-2000:]}")
    return elapsed


def main(n: int = 256, workers: tuple[int, ...] = (2,)) -> list[str]:
    import torch

    root = Path(tempfile.mkdtemp(prefix="qrobust-scale-"))
    make_folder(root, n)
    (root / "scale.yaml").write_text(PAIR)
    plain = plain_throughput(root, n)
    both = 1 / (1 / plain["fp32"] + 1 / plain["int8"])  # images/s of FP32 and the twin one after the other
    lines = [f"# {n} images at 224 px, ResNet18 FP32 + int8-x86 twin, {UNITS} evaluation units; "
             f"{os.cpu_count()} cores, torch {torch.__version__}",
             "| run | wall s | gate images/s (both models) | share of plain throughput |", "|---|---|---|---|",
             f"| plain loop, FP32 | — | {plain['fp32']:.1f} | — |", f"| plain loop, int8 | — | {plain['int8']:.1f} | — |",
             f"| plain loop, both | — | {both:.1f} | 100% |"]
    serial = None
    for w in (1, *workers):
        seconds = gate(root, w)
        serial = serial or seconds
        rate = UNITS * n / seconds
        lines.append(f"| gate, {'serial' if w == 1 else f'-n {w}'} | {seconds:.1f} | {rate:.1f} | {rate / both:.0%} "
                     f"({seconds / serial:.2f}x serial) |")
    if torch.cuda.is_available():
        seconds = gate(root, 1, "cuda")
        lines.append(f"| gate, --qrobust-device cuda | {seconds:.1f} | {UNITS * n / seconds:.1f} | — |")
    return lines


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    print("\n".join(main(args[0] if args else 256, tuple(args[1:]) or (2,))))
    print(textwrap.dedent("""
        'both' is the throughput of running the FP32 model and the twin on every image in a tight loop;
        the gate also decodes, perturbs, computes metrics and bootstraps, and builds the pair in each run."""))
