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


@pytest.mark.slow
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


# ---- round 2: hostile thresholds files, images, boxes, report writes (issue 12) ------------------------------
from helpers import SUITE, thresholds  # noqa: E402


def usage_line(pytester, *args) -> str:
    """The run's one ERROR line (in-process: reading a FIFO or /dev/zero would hang or exhaust memory here,
    so a regression shows as this test never finishing; CI's timeout catches it)."""
    result = pytester.runpytest(*args)
    errors = [line for line in result.stderr.lines if line.startswith("ERROR:")]
    assert result.ret == pytest.ExitCode.USAGE_ERROR and len(errors) == 1, result.stderr.str()
    assert "Traceback" not in result.stderr.str() + result.stdout.str()
    return errors[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_or_a_device_as_thresholds_file_is_refused_at_once(pytester):
    os.mkfifo(pytester.path / "fifo.yaml")
    pytester.makepyfile(test_gate=SUITE)
    assert "thresholds file" in usage_line(pytester, "--qrobust-thresholds", "fifo.yaml") and "not a regular file"
    (pytester.path / "zero.yaml").symlink_to("/dev/zero")
    assert "not a regular file" in usage_line(pytester, "--qrobust-thresholds", "zero.yaml")


# a billion laughs under a tolerance key: nine levels of nine references, 9**9 leaves if expanded
BOMB = "defaults: {top1_delta: [&a [x, x, x, x, x, x, x, x, x], " + ", ".join(
    f"&{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)) + "]}\n"


@pytest.mark.parametrize("text, message", [
    ("? [a, b]\n: 1\n", "a key must be a plain value, not a sequence (line 1)"),
    ("latency: {pairs: 5}\ngate: {lenet5-digits-int8-x86: {}}\n", "latency.pairs: expected a list of pair names, got int 5"),
    ("bitwidth: {pairs: [lenet5-digits-asym4], level: abc, tolerances: {kl_mean: 0.02}}\n",
     "bitwidth.level: expected a number, got the string 'abc'"),
    ("defaults: " + "[" * 20000 + "]" * 20000 + "\n", "nested more than 64 levels deep"),
    ("".join("  " * i + f"k{i}:\n" for i in range(1000)) + "  " * 1000 + "v: 1\n", "nested more than 64 levels deep"),
    (BOMB, "defaults.top1_delta: expected a number, got list [["),
    ('defaults: {"top1_delta\\n::notice title=x::forged": 0.1}\n', r"defaults.'top1_delta\n::notice title=x::forged': unknown key"),
    ('defaults: {"\\x1b[31mred": 0.1}\n', r"'\x1b[31mred': unknown key"),
    ("defaults:\n  ? " + "k" * 1_000_000 + "\n  : 0.1\n", "kkkk...kkkk"),
    ("d\u0435faults: {}\n", "did you mean 'defaults'? (yours has U+0435 CYRILLIC SMALL LETTER IE)"),
    ("gate: {lenet5-digits-int8-x86: {}}\n" + "#" * (5 * 2**20), "over the limit of 4194304 bytes"),
])
def test_hostile_thresholds_are_one_printable_line(pytester, text, message):
    (pytester.path / "thresholds.yaml").write_bytes(text.encode("utf-8"))
    pytester.makepyfile(test_gate=SUITE)
    start = time.perf_counter()
    line = usage_line(pytester)
    assert message in line, line
    assert line.isprintable() and len(line) < 600 and time.perf_counter() - start < 60


def test_a_fifo_among_the_images_and_a_decompression_bomb_are_named(tmp_path):
    from PIL import Image

    from qrobust.data.folders import ImageReader, folder_dataset

    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "ok.png")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "a" / "stuck.png")
        with pytest.raises(InvalidArgument, match=r"dataset='d': 1 of 2 images .*: 'a/stuck.png' \(not a regular file\)"):
            folder_dataset("d", tmp_path, ImageReader((8, 8)))
        os.unlink(tmp_path / "a" / "stuck.png")
    Image.new("1", (9000, 9000)).save(tmp_path / "a" / "bomb.png")  # 10 kB on disk, 81 M pixels decoded
    with pytest.raises(InvalidArgument, match=r"'a/bomb.png' \(9000x9000 pixels, over the limit of 64000000\)"):
        folder_dataset("d", tmp_path, ImageReader((8, 8)))  # probed from its header, before any batch
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "bomb.png")
    data = folder_dataset("d", tmp_path, ImageReader((8, 8)))
    Image.new("1", (9000, 9000)).save(tmp_path / "a" / "bomb.png")  # swapped after the probe: decoding refuses it
    with pytest.raises(InvalidArgument, match=r"bomb.png'.*9000x9000 pixels, over the limit of 64000000"):
        list(data.batches(2))


@pytest.mark.parametrize("boxes, message", [
    ('{"a/ok.png": [1, 2, 3]}', "expected [x0, y0, x1, y1] as four finite numbers, got [1, 2, 3]"),
    ('{"a/ok.png": ["0", 0, 4, 4]}', "expected [x0, y0, x1, y1] as four finite numbers"),
    ('{"a/ok.png": [0, 0, NaN, 4]}', "expected [x0, y0, x1, y1] as four finite numbers, got [0, 0, nan, 4]"),
    ("not json", "is not valid JSON"),
    ("[1, 2]", "must map each image's relative path to [x0, y0, x1, y1], got list"),
    ('{"a/other.png": [0, 0, 4, 4]}', "has no box for 'a/ok.png'"),
])
def test_malformed_boxes_name_the_file(tmp_path, boxes, message):
    from PIL import Image

    from qrobust.data.folders import ImageReader, folder_dataset

    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "ok.png")
    (tmp_path / "boxes.json").write_text(boxes)
    with pytest.raises(InvalidArgument, match=r"boxes.json") as info:
        folder_dataset("d", tmp_path, ImageReader((8, 8)), tmp_path / "boxes.json")
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_checkpoint_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "weights.pt")
    with pytest.raises(InvalidArgument, match="checkpoint .*weights.pt': not a regular file"):
        load_checkpoint(tmp_path / "weights.pt")


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else False, reason="root writes anywhere")
def test_an_unwritable_report_fails_the_run_with_the_reason(pytester):
    pytester.makefile(".yaml", thresholds=thresholds())
    pytester.makepyfile(test_gate=SUITE)
    (pytester.path / "locked").mkdir()
    os.chmod(pytester.path / "locked", 0o500)
    result = pytester.runpytest("--qrobust-report", "locked/report")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*qrobust: FAILED: report not written: *Permission*"])


def test_a_report_that_cannot_be_written_fails_the_run_with_the_reason(pytester):
    """A file where the report directory should be: refused before any model work (exit 4), the file
    intact; a folder that turns unwritable during the run fails it at the end, in JUnit too."""
    pytester.makefile(".yaml", thresholds=thresholds())
    pytester.makepyfile(test_gate=SUITE)
    (pytester.path / "blocked").write_text("a file, not a folder")
    result = pytester.runpytest("--qrobust-report", "blocked/report")
    assert result.ret == pytest.ExitCode.USAGE_ERROR and "building pair" not in result.stdout.str()
    assert "cannot write the report there" in result.stderr.str()
    assert (pytester.path / "blocked").read_text() == "a file, not a folder"  # nothing lost
    pytester.makeconftest("""
        import shutil
        from pathlib import Path

        def pytest_collection_finish(session):  # after the start's check: the folder becomes a file
            shutil.rmtree("later")
            Path("later").write_text("a file now")
    """)
    result = pytester.runpytest("--qrobust-report", "later", "--junitxml=junit.xml")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*qrobust: FAILED: report not written: *"])
    assert 'failures="1"' in (pytester.path / "junit.xml").read_text()  # the qrobust::gate failure


SET_WRITER = """
import sys, json
from pathlib import Path
from qrobust._files import write_set
root, payload = Path(sys.argv[1]), "x" * 2_000_000
i = 0
while True:
    i += 1
    write_set({root / "report.html": f"<!-- run {i} -->" + payload,
               root / "report.json": json.dumps({"run": i, "payload": payload})})
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_killed_report_writer_leaves_whole_files_and_its_leftovers_are_removed(tmp_path):
    from qrobust._files import remove_stale, write_set

    write_set({tmp_path / "report.json": json.dumps({"run": 0, "payload": ""}), tmp_path / "report.html": "<!-- run 0 -->"})
    rng = np.random.default_rng(1)
    runs = set()
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", SET_WRITER, str(tmp_path)])
        time.sleep(float(rng.uniform(0.3, 1.5)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        report = json.loads((tmp_path / "report.json").read_text())  # always a whole document
        html_run = int((tmp_path / "report.html").read_text()[len("<!-- run "):].split(" ")[0])
        assert html_run in (report["run"], report["run"] + 1), (report["run"], html_run)
        runs.add(report["run"])
    assert len(runs) > 1  # the writer got through some sets before each kill
    # report.json is renamed last: a kill between the renames can leave the html one run ahead; each file
    # is whole and carries its run id. Leftover temporaries of killed writers are removed by the next write:
    remove_stale(tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))
