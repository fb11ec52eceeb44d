"""Where the gate's time goes: py-spy samples a whole ``qrobust run`` and each sample is put in one stage.

py-spy (a sampling profiler, no instrumentation in the gate) records the Python stack of every process's
main thread RATE times a second while it runs (``--subprocesses``: pytest-xdist workers too); native code,
torch's kernels included, is charged to the Python frame that called it. A sample's stage is the first
rule of STAGES its stack matches: calibration's forwards build the pair, FGSM's gradient pass perturbs,
a CAM pass's forward is a forward (the gate's one forward per batch serves the CAM and the metrics) and
its backward and maps are CAM. Idle is the rest of each process's wall time (a lock, a pipe, xdist).

Run: .venv/bin/python benchmarks/profile_gate.py [builtin | scale [N]] [--rate HZ] [--raw FILE] [-- ARGS]
  builtin: the default gate (``qrobust run``); scale: the ResNet18 pair of benchmarks/scale.py on N
  generated 224-px images (default 256). ARGS go to ``qrobust run`` (``-n 2``, ``--qrobust-pairs ...``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

# a frame is "function (path:line)"; a stage is the first rule whose test holds for a sample's frames
TWIN_CODE = ("torch/ao/", "qrobust/quant/", "qrobust/runtimes/", "onnxruntime/", "torch/_export/", "torch/fx/")
STAGES = (
    ("imports and start-up", lambda f: any(x.startswith("_find_and_load ") for x in f)),
    ("build pairs (load, calibrate, convert)", lambda f: _in(f, "qrobust/gate/pairs.py")),
    ("quantizer properties (Hypothesis)", lambda f: _in(f, "qrobust/quant/properties.py", "hypothesis/")),
    ("decode", lambda f: _in(f, "qrobust/data/folders.py", "qrobust/data/datasets.py", "qrobust/data/builtin.py",
                             "PIL/", "torch/utils/data/")),
    ("per-layer diagnosis", lambda f: _in(f, "qrobust/quant/diagnosis.py", "qrobust/gate/diagnosis.py",
                                          "qrobust/gate/sensitivity.py")),
    ("perturb", lambda f: _in(f, "qrobust/data/perturbations.py") or any(x.startswith("Evaluator._perturb ") for x in f)),
    ("forward: twin", lambda f: _in(f, "qrobust/placement.py") and _in(f, *TWIN_CODE)),
    ("forward: FP32", lambda f: _in(f, "qrobust/placement.py")),
    ("CAM (maps, gradients)", lambda f: _in(f, "qrobust/explain/")),
    ("statistics (bootstrap, intervals)", lambda f: _in(f, "qrobust/metrics/stats.py")),
    ("per-sample metrics", lambda f: _in(f, "qrobust/metrics/")),
    ("evaluation loop", lambda f: _in(f, "qrobust/gate/engine.py")),
    ("verdicts and report", lambda f: _in(f, "qrobust/gate/", "qrobust/session.py", "pytest_benchmark/")),
    ("pytest and collection", lambda f: True),
)
IDLE = "idle"


def _in(frames: list[str], *paths: str) -> bool:
    return any(p in x for x in frames for p in paths)


def stage_of(frames: list[str]) -> str:
    """The stage of one sample, its frames from the outermost to the innermost."""
    return next(name for name, test in STAGES if test(frames))


def parse_raw(text: str) -> dict[int, Counter]:
    """py-spy's raw output (``--threads --subprocesses``) as {process id: Counter(stage -> samples)}, main
    threads only. A line is ``process P:"cmd";...;thread (T): Name;frame;... COUNT``; a command line holding
    a newline continues on the next line."""
    stages: dict[int, Counter] = {}
    pending = ""
    for line in text.splitlines():
        pending += line
        match = re.search(r" (\d+)$", pending)
        if not match:
            pending += "\n"
            continue
        stack, count, pending = pending[:match.start()], int(match.group(1)), ""
        processes = [int(p) for p in re.findall(r'(?:^|;)process (\d+):"', stack)]
        thread = re.search(r'(?:^|;)thread \((\d+)\)[^;]*', stack)
        if not processes or not thread or int(thread.group(1)) != processes[-1]:
            continue  # a thread other than its process's main thread (xdist's I/O, DataLoader pins)
        frames = [f for f in stack[thread.end():].split(";") if f]
        stages.setdefault(processes[-1], Counter())[stage_of(frames)] += count
    return stages


def profile(args: list[str], cwd: Path, rate: int, raw: Path) -> tuple[float, dict[int, Counter]]:
    """Run ``qrobust run ARGS -q`` under py-spy; (wall seconds, samples per process and stage)."""
    spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy is not installed: pip install py-spy (the test extra has it)")
    command = [spy, "record", "--rate", str(rate), "--format", "raw", "--threads", "--subprocesses",
               "--output", str(raw), "--", sys.executable, "-m", "qrobust", "run", *args, "-q", "-p", "no:randomly"]
    start = time.perf_counter()
    run = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if not raw.exists():
        raise SystemExit(f"py-spy wrote no profile (exit {run.returncode}): {run.stderr.strip()[-2000:]}")
    # py-spy does not pass on the gate's exit status: a run that wrote no report (a usage error, a crash)
    # profiled no gate; one whose report holds errors timed broken pairs, not the gate
    report = cwd / "qrobust-report" / "report.json"
    if not report.exists() or json.loads(report.read_text())["summary"].get("error"):
        raise SystemExit(f"qrobust run under py-spy gated nothing or had errors:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
    return wall, parse_raw(raw.read_text())


def table(wall: float, samples: dict[int, Counter], rate: int) -> list[str]:
    """Seconds per stage, summed over processes, and their share of the processes' wall time; idle is what
    py-spy did not see running (each process counted for the whole run)."""
    total = Counter()
    for counts in samples.values():
        total.update(counts)
    seconds = {name: total[name] / rate for name, _ in STAGES if total[name]}
    # under load py-spy's clock drifts and it can count more samples than the wall time holds (a CI run saw
    # 103%): shares are then of what it saw, with no idle time
    budget = max(wall * len(samples), sum(seconds.values()))
    seconds[IDLE] = budget - sum(seconds.values())
    lines = [f"# {len(samples)} process(es) over {wall:.1f} s wall, {sum(total.values())} samples at {rate} Hz",
             "| stage | seconds | share |", "|---|---|---|"]
    lines += [f"| {name} | {s:.1f} | {s / budget:.1%} |" for name, s in sorted(seconds.items(), key=lambda kv: -kv[1])]
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gate", nargs="?", default="builtin", choices=("builtin", "scale"))
    parser.add_argument("images", nargs="?", type=int, default=256, help="scale: how many images (default 256)")
    parser.add_argument("--rate", type=int, default=100, help="samples per second (default 100)")
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw stacks here")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    options, rest = parser.parse_args(argv[:split]), argv[split + 1:]  # after --: arguments for qrobust run
    folder = Path(tempfile.mkdtemp(prefix="qrobust-profile-"))
    args = rest
    if options.gate == "scale":
        import scale

        scale.make_folder(folder, options.images)
        (folder / "scale.yaml").write_text(scale.PAIR)
        args = ["scale.yaml", *rest]
    raw = options.raw or folder / "profile.txt"
    wall, samples = profile(args, folder, options.rate, raw)
    lines = [f"## {options.gate} gate{' on ' + str(options.images) + ' images' if options.gate == 'scale' else ''}"
             f" {' '.join(rest)}".rstrip(), *table(wall, samples, options.rate)]
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
