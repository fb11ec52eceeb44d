"""The ``--qrobust-*`` options, parsed at the boundary (import-light: neither torch nor pytest).

Each parser raises ``argparse.ArgumentTypeError`` naming the bad value, so a bad option is one line when
pytest starts, whether it came from the command line, the environment or the ini file.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from collections.abc import Callable

from qrobust.errors import show

DECISIONS = ("point", "strict", "lenient")
DEVICE = re.compile(r"^(cpu|mps|(cuda|xpu)(:\d+)?)$")


def _whole(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected a whole number, got {show(text)}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def parse_device(text: str) -> str:
    if not DEVICE.match(text or ""):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N, mps or xpu[:N], got {show(text)}")
    return text


def parse_decision(text: str) -> str:
    if text not in DECISIONS:
        raise argparse.ArgumentTypeError(f"expected {', '.join(DECISIONS)}, got {show(text)}")
    return text


def parse_pairs(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated pair names, got {show(text)}")
    return names


def parse_path(text: str) -> str:
    if not text or "\x00" in text:
        raise argparse.ArgumentTypeError(f"expected a path, got {show(text)}")
    return text


@dataclass(frozen=True)
class OptionSpec:
    name: str
    help: str
    parse: Callable[[str], object]
    default: object = None
    is_path: bool = False

    @property
    def flag(self) -> str:
        return f"--qrobust-{self.name}"

    @property
    def dest(self) -> str:
        return "qrobust_" + self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return "QROBUST_" + self.name.replace("-", "_").upper()

    @property
    def metavar(self) -> str:
        return {"thresholds": "PATH", "pairs": "A,B", "device": "DEV", "seed": "N", "report": "DIR",
                "decision": "MODE", "max-samples": "N", "save-baseline": "PATH", "baseline": "PATH",
                "markdown": "PATH", "sensitivity": "N"}[self.name]


OPTIONS = (
    OptionSpec("thresholds", "thresholds YAML to gate with (default: thresholds.yaml at the rootdir, when present)",
               parse_path, is_path=True),
    OptionSpec("pairs", "comma-separated pair names to gate (default: every pair in the thresholds' gate)", parse_pairs),
    OptionSpec("device", "torch device for FP32 and fake-quant models (cpu, cuda, cuda:1, mps); real int8 "
                         "twins always run on the CPU", parse_device, default="cpu"),
    OptionSpec("seed", "seed of perturbations and bootstrap (default: the thresholds' seed)", _whole(0)),
    OptionSpec("report", "directory for report.json and report.html", parse_path, default="qrobust-report",
               is_path=True),
    OptionSpec("decision", "point | strict | lenient (default: the thresholds' decision)", parse_decision),
    OptionSpec("max-samples", "cap every dataset at N samples, a seeded subsample (a quick profile)", _whole(1)),
    OptionSpec("save-baseline", "save every case's values to this JSON file after the run", parse_path, is_path=True),
    OptionSpec("baseline", "compare every case with this saved baseline; a regression beyond its margin fails",
               parse_path, is_path=True),
    OptionSpec("sensitivity", "on a failing case, requantize the pair with each of its N worst layers kept in FP32 "
                              "and suggest a keep_fp32 list (off by default: it costs N+ calibrations)", _whole(0)),
    OptionSpec("markdown", "write a Markdown summary (for a PR comment) to this file; $GITHUB_STEP_SUMMARY gets it "
                           "too when set", parse_path, is_path=True),
)
BY_NAME = {o.name: o for o in OPTIONS}
FLAGS = {
    "overwrite-baseline": "allow --qrobust-save-baseline to replace an existing file",
    "baseline-any-env": "compare with a baseline recorded in a different environment (torch, CPU, weights)",
}
