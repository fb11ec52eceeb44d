"""Gate power: which realistic quantization bugs the default gate catches on LeNet-5, and which benign
recipe changes it lets through.

Each fault and each benign variant is a twin of the built-in LeNet-5 (the shipped weights), built
through the public API and declared as a pair in YAML (``builder: gate_power:NAME`` returning the
(FP32, twin) tuple); every pair is gated by ``qrobust run`` with the built-in gate's defaults and sweep,
exactly as ``lenet5-digits-int8-x86`` is. A fault is caught when any check fails; the table names the
check with the largest relative violation, and whether a plain clean top-1 comparison would have seen it.

Run: .venv/bin/python benchmarks/gate_power.py [--qrobust-max-samples 200]   (about 4 minutes on 2 cores)
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from torch import nn

from qrobust import get_preset, load_dataset, load_pair, quantize_model

PAIR = "lenet5-digits-int8-x86"


def _base():
    pair = load_pair(PAIR)
    return pair.fp32, pair.preprocess


def _calibration(start: int = 0, count: int = 256, label: int | None = None) -> list[torch.Tensor]:
    _, pre = _base()
    train = load_dataset("digits-train")
    images = train.images if label is None else train.images[train.labels == label]
    return list(pre.normalize(images[start:start + count]).split(64))


def _int8(preset: str = "int8-x86", calibration=None, **overrides):
    fp32, _ = _base()
    return fp32, quantize_model(fp32, get_preset(preset, **overrides), calibration or _calibration())


def _fake_with(layer: str, change) -> tuple[nn.Module, nn.Module]:
    """A fake-quant w8a8 twin whose ``layer`` (a FakeQuantLayer) is edited by ``change``."""
    fp32, twin = _int8("fake-w8a8")
    change(twin.get_submodule(layer))
    return fp32, twin


# ---- faults: each reproduces a kind of bug reported against quantization tools ------------------------------
def blank_calibration():
    """Calibrated on one blank image (a calibration loader that yields zeros): every activation range
    collapses."""
    _, pre = _base()
    return _int8(calibration=[pre.normalize(torch.zeros(1, 1, 32, 32))])


def one_class_calibration():
    """Calibrated on one class only (an unshuffled calibration loader taking its first batches)."""
    return _int8(calibration=_calibration(label=0, count=128))


def per_tensor_weights():
    """Per-tensor min/max weights where the recipe says per-channel (a dropped per_channel flag)."""
    return _int8("int8-x86-per-tensor-minmax")


def conv_at_4_bits():
    """One conv silently at 4-bit weights (a per-layer override applied to the wrong layer)."""
    fp32, twin = _int8("fake-w8a8")
    _, low = _int8("fake-w4a8")
    twin.features[3] = low.features[3]
    return fp32, twin


def convs_left_in_float():
    """Both convs left in float, only the Linear layers quantized (dynamic quantization's coverage)."""
    return _int8(keep_fp32=("features.0", "features.1", "features.3", "features.4"))


def zero_point_off_by_3():
    """One activation zero point off by 3 (an off-by-N in a converter's zero-point arithmetic)."""
    def shift(layer):
        qp = layer.act_qparams
        layer.act_qparams = dataclasses.replace(qp, zero_point=qp.zero_point + 3)
    return _fake_with("features.3", shift)


def scale_doubled():
    """One activation scale doubled (a requantization multiplier computed with the wrong input scale)."""
    def double(layer):
        layer.act_qparams = dataclasses.replace(layer.act_qparams, scale=layer.act_qparams.scale * 2)
    return _fake_with("classifier.3", double)


def six_bit_grid():
    """6-bit weights and activations where 8 were meant (a bit width taken from the wrong config)."""
    return _int8("fake-asym6")


def preprocessing_drift():
    """The twin's pipeline normalizes with mean 0.45 instead of 0.5 (preprocessing drift between the
    FP32 reference and the deployed model): its input is shifted by 0.05 / 0.5 before the int8 graph."""
    fp32, twin = _int8()
    twin.register_forward_pre_hook(lambda module, args: (args[0] + 0.05 / 0.5,))
    return fp32, twin


# ---- benign variants: recipe changes a gate must not fail ---------------------------------------------------
def recalibrated_other_subset():
    """int8-x86 calibrated on another 256 training digits."""
    return _int8(calibration=_calibration(start=256))


def calibrated_on_1024():
    """int8-x86 calibrated on 1,024 training digits."""
    return _int8(calibration=_calibration(count=1024))


def fbgemm_engine():
    """int8 on the fbgemm engine (PyTorch's other x86 backend)."""
    return _int8("int8-fbgemm")


def histogram_fake_quant():
    """Seed 004's Table 3.2 recipe (histogram activation observers) as a fake-quant twin."""
    return _int8("fake-table3.2")


def sixteen_bit():
    """16-bit fake quantization."""
    return _int8("fake-w16a16")


FAULTS = [blank_calibration, one_class_calibration, per_tensor_weights, conv_at_4_bits, convs_left_in_float,
          zero_point_off_by_3, scale_doubled, six_bit_grid, preprocessing_drift]
BENIGN = [recalibrated_other_subset, calibrated_on_1024, fbgemm_engine, histogram_fake_quant, sixteen_bit]


def thresholds(names: list[str]) -> dict:
    """The built-in gate's defaults and sweep, gating each variant as it gates lenet5-digits-int8-x86."""
    import qrobust

    builtin = yaml.safe_load((Path(qrobust.__file__).parent / "thresholds.yaml").read_text(encoding="utf-8"))
    pair = {"num_classes": 10, "preprocess": {"resolution": [32, 32], "mean": [0.5], "std": [0.5]},
            "dataset": "digits-test", "target_layer": "features.4"}
    return {"decision": builtin["decision"], "seed": builtin["seed"], "replicates": builtin["replicates"],
            "defaults": builtin["defaults"], "perturbations": builtin["perturbations"],
            "pairs": {name: {"builder": f"gate_power:{name}", **copy.deepcopy(pair)} for name in names},
            "gate": {name: copy.deepcopy(builtin["gate"][PAIR]) for name in names}}


def closest(records: list[dict]) -> str:
    """The check nearest to failing (or failing the most), relative to its tolerance."""
    gated = [r for r in records if r.get("tolerance") and r.get("margin") is not None]  # a 0 tolerance says nothing
    if not gated:
        return "-"
    r = min(gated, key=lambda r: r["margin"] / max(abs(r["tolerance"]), 1e-12))
    return f"{r['metric']} {r['value']:.4g} vs {r['tolerance']:g} at {r['perturbation']} {r['level']:g}"


def main(extra: list[str]) -> None:
    names = [f.__name__ for f in FAULTS + BENIGN]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "power.yaml"
        path.write_text(yaml.safe_dump(thresholds(names)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
        run = subprocess.run([sys.executable, "-m", "qrobust", "run", str(path), "-q", "-p", "no:randomly", *extra],
                             cwd=folder, env=env, capture_output=True, text=True, timeout=3600)
        report = json.loads((Path(folder) / "qrobust-report" / "report.json").read_text())
    by_pair: dict[str, list[dict]] = {}
    for record in report["cases"]:
        by_pair.setdefault(record["pair"], []).append(record)
    broken = [line for line in run.stdout.splitlines() if "cannot be gated" in line]
    if broken:
        raise SystemExit("pairs that could not be gated:\n" + "\n".join(dict.fromkeys(broken)))
    print("| twin | kind | default gate | strongest check (failing, or nearest to failing) | worst kl_mean | clean top-1 alone |")
    print("|---|---|---|---|---|---|")
    for group, functions in (("fault", FAULTS), ("benign", BENIGN)):
        for fn in functions:
            records = by_pair.get(fn.__name__, [])
            clean = [r for r in records if r["metric"] == "top1_delta" and r["level"] == 0 and r["verdict"] == "fail"]
            failed = any(r["verdict"] == "fail" for r in records)
            verdict = ("**caught**" if failed else "missed") if group == "fault" else ("**false alarm**" if failed else "passes")
            print(f"| `{fn.__name__}`: {fn.__doc__.split('(')[0].strip()} | {group} | {verdict} ({len(records)} checks) | "
                  f"{closest(records)} | {max((r['value'] for r in records if r['metric'] == 'kl_mean'), default=float('nan')):.2g} | "
                  f"{'fails' if clean else 'passes'} |")
    caught = sum(any(r["verdict"] == "fail" for r in by_pair.get(f.__name__, [])) for f in FAULTS)
    alarms = sum(any(r["verdict"] == "fail" for r in by_pair.get(f.__name__, [])) for f in BENIGN)
    samples = report["environment"]["pairs"][names[0]]["samples"]
    print(f"\ncaught {caught} of {len(FAULTS)} faults; {alarms} of {len(BENIGN)} benign twins failed (n = {samples})")


if __name__ == "__main__":
    main(sys.argv[1:])
