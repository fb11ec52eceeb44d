"""The ``--qrobust-*`` options, parsed at the boundary (import-light: neither torch nor pytest).

Each parser raises ``argparse.ArgumentTypeError`` naming the bad value, so a bad option is one line when
pytest starts, whether it came from the command line, the environment or the ini file. Each option's
``metavar`` and ini type are declared here once: ``--help`` shows them, the README's Options table lists
them, and a test keeps the three equal.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from collections.abc import Callable

from qrobust.errors import show
from qrobust.gate.modes import DECISIONS

SEED_MAX = 2**32 - 1  # the range every generator seeded from it takes (numpy's RandomState included)
DEVICE = re.compile(r"^(cpu|mps|(cuda|xpu)(:\d+)?)$")


def _whole(minimum: int, maximum: int = 2**31 - 1) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected a whole number, got {show(text)}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
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


X86_KERNELS = ("fbgemm", "onednn")  # the libraries PyTorch's x86 engine picks between (qrobust.quant.convert)


def parse_x86_kernels(text: str) -> str:
    if text not in X86_KERNELS:
        raise argparse.ArgumentTypeError(f"expected {' or '.join(X86_KERNELS)}, got {show(text)}")
    return text


def parse_pairs(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated pair names, got {show(text)}")
    return names


TRUE, FALSE = ("y", "yes", "t", "true", "on", "1"), ("n", "no", "f", "false", "off", "0")  # pytest's own bool words


def parse_bool(text: str) -> bool:
    word = (text or "").strip().lower()
    if word in TRUE or word in FALSE:
        return word in TRUE
    raise argparse.ArgumentTypeError(f"expected yes/no, true/false, on/off or 1/0, got {show(text)}")


def parse_path(text: str) -> str:
    if not text or "\x00" in text:
        raise argparse.ArgumentTypeError(f"expected a path, got {show(text)}")
    return text


def parse_shard(text: str) -> tuple[int, int]:
    """``K/N``: the K-th of N jobs (1 <= K <= N)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise argparse.ArgumentTypeError(f"expected K/N with 1 <= K <= N (job K of N), got {show(text)}")
    return int(match[1]), int(match[2])


# "int" keys take a whole number, "bool" keys pytest's yes/no words, "paths" one path (pytest makes it absolute
# against the ini file's directory), "args" a list (shell-split in an ini file, a list in TOML), "string" text
INI_TYPES = ("string", "int", "bool", "paths", "args")


@dataclass(frozen=True)
class OptionSpec:
    name: str
    help: str
    parse: Callable[[str], object]
    default: object = None
    is_path: bool = False
    metavar: str = ""  # as --help and the README show it; a path's is PATH unless set
    ini: str = ""  # the ini key's type (INI_TYPES); a path's is "paths" (one path, relative to the ini file)

    def __post_init__(self) -> None:
        if self.ini and self.ini not in INI_TYPES:
            raise ValueError(f"{self.name}: ini type {self.ini!r} is not one of {INI_TYPES}")
        object.__setattr__(self, "metavar", self.metavar or ("PATH" if self.is_path else "VALUE"))
        object.__setattr__(self, "ini", self.ini or ("paths" if self.is_path else "string"))

    @property
    def flag(self) -> str:
        return f"--qrobust-{self.name}"

    @property
    def dest(self) -> str:
        return "qrobust_" + self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return "QROBUST_" + self.name.replace("-", "_").upper()


OPTIONS = (
    OptionSpec("thresholds", "thresholds YAML to gate with (default: thresholds.yaml at the rootdir, when present)",
               parse_path, is_path=True),
    OptionSpec("pairs", "comma-separated pair names to gate (default: every pair in the thresholds' gate)", parse_pairs,
               metavar="A,B", ini="args"),
    OptionSpec("device", "torch device for FP32 and fake-quant models (cpu, cuda, cuda:1, mps); real int8 "
                         "twins always run on the CPU", parse_device, default="cpu", metavar="DEV"),
    OptionSpec("seed", "seed of perturbations and bootstrap (default: the thresholds' seed)", _whole(0, SEED_MAX),
               metavar="N", ini="int"),
    OptionSpec("report", "directory for report.json and report.html", parse_path, default="qrobust-report",
               is_path=True, metavar="DIR"),
    OptionSpec("decision", f"{' | '.join(DECISIONS)} (default: the thresholds' decision)", parse_decision,
               metavar="MODE"),
    OptionSpec("max-samples", "cap every dataset at N samples, a seeded subsample (a quick profile)", _whole(1),
               metavar="N", ini="int"),
    OptionSpec("save-baseline", "save every case's values to this JSON file after the run", parse_path, is_path=True),
    OptionSpec("baseline", "compare every case with this saved baseline; a regression beyond its margin fails",
               parse_path, is_path=True),
    OptionSpec("sensitivity", "on a failing case, requantize the pair with each of its N worst layers kept in FP32 "
                              "and suggest a keep_fp32 list (off by default: it costs N+ calibrations)", _whole(0),
               metavar="N", ini="int"),
    OptionSpec("x86-kernels", "run x86-engine int8 twins' convolutions on onednn (as CPUs with AVX512-VNNI do) or "
                              "fbgemm (as other CPUs do) instead of this CPU's choice: gate as another runner "
                              "would", parse_x86_kernels, metavar="LIB"),
    OptionSpec("shard", "evaluate only this job's share of every case's sample shards and write its state for "
                        "qrobust merge, which judges the whole gate (one CI matrix job of N)", parse_shard,
               metavar="K/N"),
    OptionSpec("markdown", "write a Markdown summary (for a PR comment) to this file; $GITHUB_STEP_SUMMARY gets it "
                           "too when set", parse_path, is_path=True),
)
BY_NAME = {o.name: o for o in OPTIONS}
FLAGS = {  # switches: on from the command line, or from their env var or ini key (bool), e.g. QROBUST_BASELINE_ANY_ENV=1
    "overwrite-baseline": "allow --qrobust-save-baseline to replace an existing file",
    "baseline-any-env": "compare with a baseline recorded in a different environment (torch, CPU, weights)",
    "try-fix": "on a failing case, requantize with the worst layers kept in FP32 (the --qrobust-sensitivity search, "
               "3 layers unless set) and re-judge its failing checks on the same inputs (10 minutes a run at most)",
}
