"""Perturbed pixels are the same bytes on every CPU: each family runs under the host variants this machine
can emulate, in fresh processes, and the outputs' hashes must agree.

The variants switch the kernels that differ between CI runners: ATen's vector width (``default``, no
SIMD), oneDNN's ISA (its convolutions), MKL's (its FFT), libjpeg-turbo's SIMD, and the thread count.
Before the families were made host-stable, ATEN_CPU_CAPABILITY=default changed awgn, brownian, fgsm and
resize_bilinear, ONEDNN_MAX_CPU_ISA=SSE41 changed gaussian_blur and glass_blur, one thread changed
resize_bilinear.
"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

VARIANTS = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
            "JSIMD_FORCENONE": "1", "OMP_NUM_THREADS": "1"}

HASHES = """
import hashlib, json, torch
from qrobust.data import load_dataset
from qrobust.data.perturbations import PERTURBATIONS, perturb

def digest(t):
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()

digits = load_dataset("digits-test").images[:64]
photos = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
out = {}
for name in PERTURBATIONS.names():
    spec = PERTURBATIONS.get(name)
    if spec.needs_model:
        continue
    for level in [lv for lv in spec.levels if lv > 0][:2]:
        for label, images in (("digits", digits), ("photos", photos)):
            out[f"{name}@{level:g}/{label}"] = digest(perturb(name, images, level, ids=range(len(images)), seed=0))
# the attack as the gate makes it: the engine's own inputs (float64 gradient) for the shipped LeNet
from qrobust.gate.engine import Evaluator
from qrobust.models import ModelPair
from qrobust.models.lenet import DIGITS_PREPROCESS, lenet5_digits
from qrobust.quant import get_preset
fp32 = lenet5_digits()
pair = ModelPair("lenet", fp32, fp32, get_preset("fake-w8a8"), DIGITS_PREPROCESS, num_classes=10, dataset="digits-test")
ev = Evaluator([pair], replicates=10)
for level in (0.01, 0.1):
    out[f"fgsm@{level:g}/digits"] = digest(ev.case_inputs("lenet", "fgsm", level, 128)[0])
print(json.dumps(out))
"""


def test_every_perturbation_gives_the_same_bytes_under_every_host_variant():
    runs = {name: subprocess.Popen([sys.executable, "-c", HASHES], env={**os.environ, **env}, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for name, env in {"this host": {}, **{f"{k}={v}": {k: v} for k, v in VARIANTS.items()}}.items()}
    found = {}
    for name, run in runs.items():
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, f"{name}: {err[-2000:]}"
        found[name] = json.loads(out.strip().splitlines()[-1])
    reference = found.pop("this host")
    assert len(reference) >= 40 and any(k.startswith("fgsm") for k in reference)
    for name, values in found.items():
        differ = sorted(k for k, v in values.items() if reference[k] != v)
        assert not differ, f"{name} changes {differ}"
