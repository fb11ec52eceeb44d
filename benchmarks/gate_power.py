"""Gate power: which realistic quantization bugs the default gate catches on the built-in pairs, LeNet-5 and
EfficientNet-Lite0, and which benign recipe changes it lets through.

Each fault and each benign variant is a twin of a built-in FP32 model (the shipped weights), built
through the public API and declared as a pair in YAML (``builder: gate_power:NAME`` returning the
(FP32, twin) tuple); every pair is gated by ``qrobust run`` with the built-in gate's defaults and sweep
and the built-in gate entry of its kind: ``lenet5-digits-int8-x86`` (n = 450 digits) for LeNet's int8
twins, ``lenet5-digits-w8a8`` for its fake-quant ones (both fitted to their benign spread),
``efficientnet-lite0-int8-tuned`` (49 views of 7 photos, its four perturbation families, KL-led
tolerances) for the Lite0 twins, whose recipe (``int8-qnnpack-relu6``, RGB stem in FP32) and
calibration crops they share. A fault is caught when any check fails; the table names the failing check
with the largest relative violation (or the one nearest to failing), and whether a plain clean top-1
comparison would have seen it. Under another decision mode, each row also counts the checks the point
decision fails on the same measurements.

Run: .venv/bin/python benchmarks/gate_power.py [--pairs lenet|lite0|all] [--keep-report DIR]
     [qrobust run options: --qrobust-decision familywise, --qrobust-max-samples 200, ...]
LeNet's 18 twins take about 16 minutes on an idle 2-core machine (n = 200: 8); Lite0's 13 about 69 minutes
(a benign twin ~3 minutes, a fault ~6: every failing case is also diagnosed layer by layer). ``--only a,b``
gates a subset (split a family over processes with --keep-report, then merge the reports' cases): verdicts
do not depend on which twins share a run, since every perturbation and bootstrap is seeded by the gate's
seed and the sample ids.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from gate_run import gate_report
from qrobust import get_preset, load_dataset, load_pair, quantize_model
from qrobust.suites import BUILTIN_THRESHOLDS

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


def _fake_reading(layer: str, misread) -> tuple[nn.Module, nn.Module]:
    """A fake-quant w8a8 twin whose ``layer`` (a FakeQuantLayer) reads its quantized input through
    ``misread(x, qparams)``: the producer quantizes with the calibrated scale and zero point, the consumer
    dequantizes with other ones (a mismatch, not a self-consistent change of the grid)."""
    fp32, twin = _int8("fake-w8a8")
    wrapper = twin.get_submodule(layer)
    wrapper.layer.register_forward_pre_hook(lambda module, args: (misread(args[0], wrapper.act_qparams),))
    return fp32, twin


# ---- faults: each reproduces a kind of bug reported against quantization tools ------------------------------
# ("Reported:" names a GitHub issue or pull request, owner/repo#number, where users met that kind of bug)
def blank_calibration():
    """Calibrated on one blank image (a calibration loader that yields zeros): every activation range
    collapses.
    Reported: NVIDIA/TensorRT#1102."""
    _, pre = _base()
    return _int8(calibration=[pre.normalize(torch.zeros(1, 1, 32, 32))])


def one_class_calibration():
    """Calibrated on one class only (an unshuffled calibration loader taking its first batches).
    Reported: NVIDIA/TensorRT#3187."""
    return _int8(calibration=_calibration(label=0, count=128))


def per_tensor_weights():
    """Per-tensor min/max weights where the recipe says per-channel (a dropped per_channel flag).
    Reported: tensorflow/tensorflow#57745."""
    return _int8("int8-x86-per-tensor-minmax")


def conv_at_4_bits():
    """One conv silently at 4-bit weights (a per-layer override applied to the wrong layer).
    Reported: openvinotoolkit/nncf#144."""
    fp32, twin = _int8("fake-w8a8")
    _, low = _int8("fake-w4a8")
    twin.features[3] = low.features[3]
    return fp32, twin


def convs_left_in_float():
    """Both convs left in float, only the Linear layers quantized (dynamic quantization's coverage).
    Reported: pytorch/tutorials#899."""
    return _int8(keep_fp32=("features.0", "features.1", "features.3", "features.4"))


def zero_point_off_by_3():
    """One activation read with its zero point off by 3 (an off-by-N in a converter's zero-point
    arithmetic: the consumer dequantizes (q - z - 3) * s where the producer wrote q = x / s + z).
    Reported: pytorch/FBGEMM#584."""
    return _fake_reading("features.3", lambda x, qp: x - 3 * qp.scale)


def scale_doubled():
    """One activation read with twice its scale (a requantization multiplier computed with the wrong
    input scale: the consumer dequantizes (q - z) * 2s).
    Reported: tensorflow/tensorflow#23800."""
    return _fake_reading("classifier.3", lambda x, qp: 2 * x)


def six_bit_grid():
    """6-bit weights and activations where 8 were meant (a bit width taken from the wrong config).
    Reported: ModelTC/LightCompress#163."""
    w8a8 = get_preset("fake-w8a8")
    return _int8("fake-w8a8", weight=dataclasses.replace(w8a8.weight, bits=6),
                 activation=dataclasses.replace(w8a8.activation, bits=6))


def preprocessing_drift():
    """The twin's pipeline normalizes with mean 0.45 instead of 0.5 (preprocessing drift between the
    FP32 reference and the deployed model): its input is shifted by 0.05 / 0.5 before the int8 graph.
    Reported: mlcommons/training#48."""
    fp32, twin = _int8()
    twin.register_forward_pre_hook(lambda module, args: (args[0] + 0.05 / 0.5,))
    return fp32, twin


# ---- benign variants: recipe changes a gate must not fail ---------------------------------------------------
def recalibrated_other_subset():
    """int8-x86 calibrated on another 256 training digits."""
    return _int8(calibration=_calibration(start=256))


def recalibrated_third_subset():
    """int8-x86 calibrated on a third 256 training digits."""
    return _int8(calibration=_calibration(start=512))


def calibrated_on_1024():
    """int8-x86 calibrated on 1,024 training digits."""
    return _int8(calibration=_calibration(count=1024))


def fbgemm_engine():
    """int8 on the fbgemm engine (PyTorch's other x86 backend)."""
    return _int8("int8-fbgemm")


def fake_w8a8():
    """Seed 001's w8a8 fake quantization as shipped: the recipe the fake-quant faults start from."""
    return _int8("fake-w8a8")


def w8a8_other_subset():
    """w8a8 fake quantization calibrated on another 256 training digits."""
    return _int8("fake-w8a8", calibration=_calibration(start=256))


def histogram_fake_quant():
    """Seed 004's Table 3.2 recipe (histogram activation observers) as a fake-quant twin."""
    return _int8("fake-table3.2")


def histogram_other_subset():
    """Seed 004's Table 3.2 recipe calibrated on another 256 training digits (fake-quant's recalibration)."""
    return _int8("fake-table3.2", calibration=_calibration(start=256))


def sixteen_bit():
    """16-bit fake quantization."""
    return _int8("fake-w16a16")


FAULTS = [blank_calibration, one_class_calibration, per_tensor_weights, conv_at_4_bits, convs_left_in_float,
          zero_point_off_by_3, scale_doubled, six_bit_grid, preprocessing_drift]
BENIGN = [recalibrated_other_subset, recalibrated_third_subset, calibrated_on_1024, fbgemm_engine, fake_w8a8,
          w8a8_other_subset, histogram_fake_quant, histogram_other_subset, sixteen_bit]
# the built-in gate entry that gates each fake-quant twin (Grad-CAM++ explains them, EigenCAM the int8
# ones, so their CAM tolerances differ); every other twin is gated by its family's built-in pair's entry
FAKE_QUANT_ENTRY = {fn.__name__: "lenet5-digits-w8a8" for fn in (
    conv_at_4_bits, zero_point_off_by_3, scale_doubled, six_bit_grid, fake_w8a8, w8a8_other_subset,
    histogram_fake_quant, histogram_other_subset, sixteen_bit)}


# ---- EfficientNet-Lite0: twins of efficientnet-lite0-int8-tuned ---------------------------------------------
LITE0 = "efficientnet-lite0-int8-tuned"


def _lite0():
    """The built-in tuned pair: its FP32 model, preprocessing and recipe (int8-qnnpack-relu6, RGB stem in FP32)."""
    pair = load_pair(LITE0)
    return pair.fp32, pair.preprocess, pair.config


def _lite0_calibration(photos: slice | list[int] = slice(None), batch: int = 16, reverse: bool = False) -> list[torch.Tensor]:
    """The built-in pair's calibration crops (3 per picture, 14 pictures), as it batches them (16)."""
    from qrobust.data.builtin import calibration_photos

    _, pre, _ = _lite0()
    crops = calibration_photos(pre.resolution[0])
    crops = crops[photos] if isinstance(photos, slice) else crops[torch.tensor(photos)]
    batches = list(pre.normalize(crops).split(batch))
    return batches[::-1] if reverse else batches


def _lite0_twin(calibration=None, model: nn.Module | None = None, **overrides):
    """(FP32, twin): the tuned recipe with ``overrides``, quantized from ``model`` (an edited copy of the FP32
    model, when the fault lives in the graph the quantizer sees) and calibrated as the built-in pair is."""
    fp32, _, config = _lite0()
    return fp32, quantize_model(model if model is not None else fp32, dataclasses.replace(config, **overrides),
                                calibration or _lite0_calibration())


def _lite0_edited(edit) -> nn.Module:
    model = copy.deepcopy(_lite0()[0])
    edit(model)
    return model


def _int8_misread(twin: nn.Module, layer: str, zero_point: int = 0, scale: float = 1.0) -> nn.Module:
    """Make ``layer`` of an int8 twin hand on its raw integers under another zero point / scale: the kernel
    wrote q for (scale s, zero point z), the next kernel reads (q - z - zero_point) * s * scale."""
    module = twin.graph.get_submodule(layer)

    def misread(module, args, out):
        return torch._make_per_tensor_quantized_tensor(out.int_repr(), out.q_scale() * scale,
                                                       out.q_zero_point() + zero_point)
    module.register_forward_hook(misread)
    return twin


def lite0_blank_calibration():
    """Calibrated on one black image (a calibration loader that yields zeros or an unfilled buffer):
    every activation range collapses.
    Reported: NVIDIA/TensorRT#1102."""
    _, pre, _ = _lite0()
    return _lite0_twin(calibration=[pre.normalize(torch.zeros(1, 3, *pre.resolution))])


def lite0_one_picture_calibration():
    """Calibrated on the 3 crops of one picture (a calibration loader that stops after its first batch of an
    unshuffled folder).
    Reported: NVIDIA/TensorRT#3187."""
    return _lite0_twin(calibration=_lite0_calibration(slice(0, 3)))


def lite0_per_tensor_weights():
    """Per-tensor min/max weights where the recipe says per-channel (a dropped per_channel flag; per-tensor
    weights are known to break depthwise convolutions, whose channels' ranges differ by orders of magnitude).
    Reported: tensorflow/tensorflow#57745."""
    _, _, config = _lite0()
    return _lite0_twin(weight=dataclasses.replace(config.weight, per_channel=False, observer="minmax"))


def lite0_depthwise_at_4_bits():
    """Block 1's depthwise conv on a 4-bit weight grid (a per-layer bit-width override applied to the wrong
    layer): its weights are rounded to 4-bit per-channel symmetric before int8 conversion.
    Reported: openvinotoolkit/nncf#144."""
    def four_bits(model):
        conv = model.get_submodule("_blocks.1._depthwise_conv")
        with torch.no_grad():
            scale = conv.weight.abs().amax(dim=(1, 2, 3), keepdim=True) / 7
            conv.weight.copy_((conv.weight / scale).round().clamp(-8, 7) * scale)
    return _lite0_twin(model=_lite0_edited(four_bits))


def lite0_relu6_unfused():
    """Block 0's ReLU6 not fused with its conv (a fusion pattern that misses an activation written as
    Hardtanh(0, 6) or Clip, so the conv output is quantized over its whole pre-activation range).
    Reported: pytorch/pytorch#30214."""
    def hardtanh(model):
        model._blocks[0]._act1 = nn.Hardtanh(0.0, 6.0)
    return _lite0_twin(model=_lite0_edited(hardtanh))


def lite0_depthwise_left_in_float():
    """Every depthwise conv left in float (a quantizer without a depthwise kernel that skips them silently).
    Reported: tensorflow/tensorflow#61896."""
    fp32, _, config = _lite0()
    keep = tuple(f"_blocks.{i}.{m}" for i in range(len(fp32._blocks)) for m in ("_depthwise_conv", "_bn1", "_act1"))
    return _lite0_twin(keep_fp32=config.keep_fp32 + keep)


def lite0_zero_point_off_by_3():
    """Block 3's depthwise output read with its zero point off by 3 (an off-by-N in a converter's zero-point
    arithmetic: the next kernel reads the integers with z + 3).
    Reported: pytorch/FBGEMM#584."""
    fp32, twin = _lite0_twin()
    return fp32, _int8_misread(twin, "_blocks.3._depthwise_conv", zero_point=3)


def lite0_scale_doubled():
    """Block 3's depthwise output read with twice its scale (a requantization multiplier computed with the
    wrong scale).
    Reported: tensorflow/tensorflow#23800."""
    fp32, twin = _lite0_twin()
    return fp32, _int8_misread(twin, "_blocks.3._depthwise_conv", scale=2.0)


def lite0_tf_normalization():
    """The twin's pipeline normalizes with mean 0.5 and std 0.5 (TensorFlow's [-1, 1] convention) where the
    model was trained with ImageNet's mean and std (preprocessing drift between reference and deployment).
    Reported: mlcommons/training#48."""
    fp32, twin = _lite0_twin()
    _, pre, _ = _lite0()
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    twin.register_forward_pre_hook(lambda module, args: (((args[0] * std + mean) - 0.5) / 0.5,))
    return fp32, twin


def lite0_recalibrated_other_subset():
    """The tuned recipe calibrated on every other calibration crop, 21 of 42."""
    return _lite0_twin(calibration=_lite0_calibration(list(range(0, 42, 2))))


def lite0_recalibrated_reversed():
    """The tuned recipe calibrated on the same crops in reverse order, in batches of 8."""
    return _lite0_twin(calibration=_lite0_calibration(batch=8, reverse=True))


def lite0_minmax_observer():
    """The tuned recipe with min/max activation observers instead of histogram ones."""
    _, _, config = _lite0()
    return _lite0_twin(activation=dataclasses.replace(config.activation, observer="minmax"))


def lite0_classifier_in_float():
    """The tuned recipe with its final Linear, the classifier, also kept in FP32."""
    _, _, config = _lite0()
    return _lite0_twin(keep_fp32=config.keep_fp32 + ("_fc",))


LITE0_FAULTS = [lite0_blank_calibration, lite0_one_picture_calibration, lite0_per_tensor_weights,
                lite0_depthwise_at_4_bits, lite0_relu6_unfused, lite0_depthwise_left_in_float,
                lite0_zero_point_off_by_3, lite0_scale_doubled, lite0_tf_normalization]
LITE0_BENIGN = [lite0_recalibrated_other_subset, lite0_recalibrated_reversed, lite0_minmax_observer,
                lite0_classifier_in_float]


LENET_PAIR = {"num_classes": 10, "preprocess": {"resolution": [32, 32], "mean": [0.5], "std": [0.5]},
              "dataset": "digits-test", "target_layer": "features.4"}
# family -> (the built-in pair whose gate entry gates each twin, the pair fields, faults, benign variants)
LITE0_PAIR = {"num_classes": 1000, "preprocess": {"resolution": [224, 224], "mean": [0.485, 0.456, 0.406],
                                                 "std": [0.229, 0.224, 0.225]},
              "dataset": "imagenet-photos", "target_layer": "_act1"}
FAMILIES = {"lenet": (PAIR, LENET_PAIR, FAULTS, BENIGN), "lite0": (LITE0, LITE0_PAIR, LITE0_FAULTS, LITE0_BENIGN)}


def thresholds(family: str, only: list[str] | None = None) -> dict:
    """The built-in gate's defaults and sweep, gating each variant (or those in ``only``) as it gates the
    family's built-in pair (LeNet's fake-quant twins: as it gates ``lenet5-digits-w8a8``)."""

    builtin_pair, pair, faults, benign = FAMILIES[family]
    builtin = yaml.safe_load(BUILTIN_THRESHOLDS.read_text(encoding="utf-8"))
    names = [f.__name__ for f in faults + benign if not only or f.__name__ in only]
    return {"decision": builtin["decision"], "seed": builtin["seed"], "replicates": builtin["replicates"],
            "defaults": builtin["defaults"], "perturbations": builtin["perturbations"],
            "pairs": {name: {"builder": f"gate_power:{name}", **copy.deepcopy(pair)} for name in names},
            "gate": {name: copy.deepcopy(builtin["gate"][FAKE_QUANT_ENTRY.get(name, builtin_pair)]) for name in names}}


def strongest(records: list[dict]) -> str:
    """The failing check with the largest violation relative to its tolerance, or, when none fails, the
    check nearest to failing."""
    gated = [r for r in records if r.get("tolerance") and r.get("margin") is not None]  # a 0 tolerance says nothing
    failing = [r for r in gated if r["verdict"] == "fail"]
    if not gated:
        return "-"
    r = min(failing or gated, key=lambda r: r["margin"] / max(abs(r["tolerance"]), 1e-12))
    return f"{r['metric']} {r['value']:.4g} vs {r['tolerance']:g} at {r['perturbation']} {r['level']:g}"


def gate(family: str, extra: list[str], keep: Path | None = None, only: list[str] | None = None) -> dict:
    """Gate every twin of ``family`` with ``qrobust run`` (``extra`` passes through) and return its report
    (copied to ``keep`` when given)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "power.yaml"
        path.write_text(yaml.safe_dump(thresholds(family, only)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
        report, run = gate_report([str(path), *extra], folder, env, timeout=7200)
    broken = [line for line in run.stdout.splitlines() if "cannot be gated" in line]
    if broken:
        raise SystemExit("pairs that could not be gated:\n" + "\n".join(dict.fromkeys(broken)))
    if keep:
        keep.write_text(json.dumps(report))
    return report


def point_fails(record: dict) -> bool:
    """Whether the point decision fails this record: its estimate on the wrong side of the tolerance. Every
    mode records the same margin (exact for counted metrics), so a familywise report also holds the point
    decision on the same measurements (``qrobust.gate.verdict.decide``: point passes iff margin >= 0)."""
    if record.get("margin") is not None:
        return record["margin"] < 0
    return record["verdict"] == "fail"


def table(family: str, report: dict) -> dict:
    """Print the family's Markdown table and summary line; return the counts."""
    _, _, faults, benign = FAMILIES[family]
    mode = report["environment"].get("decision")
    by_pair: dict[str, list[dict]] = {}
    for record in report["cases"]:
        by_pair.setdefault(record["pair"], []).append(record)
    faults, benign = [f for f in faults if f.__name__ in by_pair], [f for f in benign if f.__name__ in by_pair]
    failed = {name: any(r["verdict"] == "fail" for r in records) for name, records in by_pair.items()}
    point = {name: any(point_fails(r) for r in records) for name, records in by_pair.items()}
    print(f"| twin | kind | {mode} decision | strongest check (failing, or nearest to failing) | worst kl_mean | "
          "clean top-1 alone |")
    print("|---|---|---|---|---|---|")
    for group, functions in (("fault", faults), ("benign", benign)):
        for fn in functions:
            records = by_pair.get(fn.__name__, [])
            clean = [r for r in records if r["metric"] == "top1_delta" and r["level"] == 0 and point_fails(r)]
            hit = failed.get(fn.__name__, False)
            verdict = ("**caught**" if hit else "missed") if group == "fault" else ("**false alarm**" if hit else "passes")
            counts = f"{sum(r['verdict'] == 'fail' for r in records)} of {len(records)} checks fail"
            open_ = sum(r["verdict"] == "inconclusive" for r in records)
            counts += f", {open_} inconclusive" if open_ else ""
            if mode != "point":
                counts += f"; point: {sum(point_fails(r) for r in records)} fail"
            print(f"| `{fn.__name__}`: {fn.__doc__.split('(')[0].strip().rstrip('.')} | {group} | {verdict} ({counts}) | "
                  f"{strongest(records)} | {max((r['value'] for r in records if r['metric'] == 'kl_mean'), default=float('nan')):.2g} | "
                  f"{'fails' if clean else 'passes'} |")
    caught = sum(failed.get(f.__name__, False) for f in faults)
    alarms = sum(failed.get(f.__name__, False) for f in benign)
    samples = report["environment"]["pairs"][next(iter(by_pair))]["samples"]
    print(f"\n{family}: caught {caught} of {len(faults)} faults; {alarms} of {len(benign)} benign twins failed "
          f"(decision {mode}, n = {samples})")
    row = {"family": family, "decision": mode, "n": samples, "caught": caught, "faults": len(faults),
           "false_alarms": alarms, "benign": len(benign)}
    if mode != "point":
        row["point_caught"] = sum(point.get(f.__name__, False) for f in faults)
        row["point_false_alarms"] = sum(point.get(f.__name__, False) for f in benign)
        print(f"the point decision on the same measurements: caught {row['point_caught']} of {len(faults)}; "
              f"{row['point_false_alarms']} of {len(benign)} benign twins failed")
    return row


def shown_options(command: list[str]) -> list[str]:
    """The sample-size and decision options of a kept report's command, with their values (``--opt=v`` or
    ``--opt v``), to title its table."""
    shown = []
    for i, arg in enumerate(command):
        if arg.startswith(("--qrobust-max-samples", "--qrobust-decision")):
            takes_next = "=" not in arg and i + 1 < len(command)
            shown += [arg, command[i + 1]] if takes_next else [arg]
    return shown


def main(argv: list[str]) -> list[dict]:
    """``--pairs lenet|lite0|all`` (default all); every other argument passes to ``qrobust run``
    (``--qrobust-decision familywise``, ``--qrobust-max-samples 200``). ``--keep-report DIR`` saves each
    family's report.json there; ``--from-report DIR`` prints the tables of saved reports without gating."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", choices=[*FAMILIES, "all"], default="all")
    parser.add_argument("--keep-report", type=Path, metavar="DIR")
    parser.add_argument("--from-report", type=Path, metavar="DIR")
    parser.add_argument("--only", type=lambda text: text.split(","), metavar="NAME,...",
                        help="gate only these twins (to split a family over processes; their reports merge)")
    args, extra = parser.parse_known_args(argv)
    rows = []
    for family in FAMILIES if args.pairs == "all" else [args.pairs]:
        started = time.perf_counter()
        if args.from_report:
            report = json.loads((args.from_report / f"{family}.json").read_text())
        else:
            if args.keep_report:
                args.keep_report.mkdir(parents=True, exist_ok=True)
            report = gate(family, extra, args.keep_report / f"{family}.json" if args.keep_report else None, args.only)
        options = extra or shown_options(report.get("command", []))
        print(f"\n#### {family}: qrobust run {' '.join(options)}\n")
        rows.append(table(family, report))
        if not args.from_report:
            print(f"({time.perf_counter() - started:.0f} s)")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
