"""Hostile and broken inputs: a NaN among 1,000 outputs, fuzzed checkpoints, writes killed mid-way."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from qrobust.data import ImageSet
from qrobust.gate.engine import Evaluator
from qrobust.errors import InvalidArgument
from qrobust.models.checkpoints import load_checkpoint
from qrobust.models import ModelPair, Preprocess
from qrobust.quant import get_preset


class NaNForOneSample(nn.Module):
    """Returns NaN for inputs whose first pixel carries a marker value."""

    def __init__(self, inner, marker):
        super().__init__()
        self.inner, self.marker = inner, marker

    def forward(self, x):
        out = self.inner(x)
        hit = (x[:, 0, 0, 0] - self.marker).abs() < 1e-6
        return torch.where(hit[:, None], torch.full_like(out, float("nan")), out)


def test_one_nan_in_a_thousand_outputs_fails_the_case_with_its_sample_id():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    images = torch.rand(1000, 1, 12, 12, generator=torch.Generator().manual_seed(1)) * 0.9
    images[737, 0, 0, 0] = 0.95  # the one sample the twin chokes on
    pre = Preprocess((12, 12), (0.0,), (1.0,))
    data = ImageSet("thousand", images, torch.arange(1000) % 3, torch.arange(1000), torch.arange(1000), 3)
    pair = ModelPair("p", model, NaNForOneSample(model, 0.95), get_preset("fake-w8a8"), pre, num_classes=3,
                     dataset="thousand")
    result = Evaluator([pair], datasets={"thousand": data}, replicates=50).evaluate("p", "occlusion_vertical", 0)
    assert not result.healthy and result.n == 999
    assert "quantized: 1 of 1000" in result.health_message() and "[737]" in result.health_message()


def test_a_hundred_fuzzed_checkpoints_fail_with_one_line(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(nn.Linear(16, 16).state_dict(), good)
    data = good.read_bytes()
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for i in range(100):
        path = tmp_path / f"fuzz{i}.pt"
        if i % 2:  # truncated at a random point
            path.write_bytes(data[: int(rng.integers(0, len(data)))])
        else:  # the real file with random bytes flipped
            mutated = bytearray(data)
            for pos in rng.integers(0, len(data), size=8):
                mutated[pos] = int(rng.integers(0, 256))
            path.write_bytes(bytes(mutated))
        try:
            load_checkpoint(path)
        except InvalidArgument as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
    assert time.perf_counter() - start < 60  # no hang


WRITER = """
import sys, json
from qrobust._files import write_atomic
path, payload = sys.argv[1], "x" * 2_000_000
i = 0
while True:
    i += 1
    write_atomic(path, json.dumps({"version": i, "payload": payload}))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_writer_killed_at_random_points_never_leaves_a_partial_report(tmp_path):
    target = tmp_path / "report.json"
    target.write_text(json.dumps({"version": 0, "payload": ""}))
    rng = np.random.default_rng(0)
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)])
        time.sleep(float(rng.uniform(0.2, 1.5)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        report = json.loads(target.read_text())  # always a whole JSON document
        assert report["version"] == 0 or len(report["payload"]) == 2_000_000
