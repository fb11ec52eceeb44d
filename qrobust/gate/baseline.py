"""Baselines: every case's value from a run, saved, and compared with a later run.

A baseline only compares runs whose numbers are comparable: the fingerprint (torch, torchvision, CPU
capability, seed, the weights' tensor fingerprints) must match unless the user says otherwise.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from qrobust._files import MiB, read_bounded
from qrobust._validation import is_number
from qrobust.errors import ConfigError, InvalidArgument, show
from qrobust.gate.config import BaselineMargin
from qrobust.metrics.catalog import METRICS

MAX_BYTES = 64 * MiB
FINGERPRINT_KEYS = ("torch", "torchvision", "cpu_capability", "seed", "weights")


def case_key(case: dict) -> str:
    return f"{case['pair']}|{case['perturbation']}|{case['level']:g}|{case['metric']}"


def fingerprint(environment: dict) -> dict:
    """What must match for two runs' numbers to be comparable."""
    return {k: environment.get(k) for k in FINGERPRINT_KEYS}


def baseline_document(report: dict) -> dict:
    values = {case_key(c): c["value"] for c in report["cases"] if c["value"] is not None}
    return {"run_id": report["run_id"], "fingerprint": fingerprint(report["environment"]), "values": values}


def refuse_overwrite(path: str | Path, overwrite: bool) -> None:
    """A saved baseline is never replaced without --qrobust-overwrite-baseline (checked at start and again
    when the run's report set is written)."""
    if Path(path).exists() and not overwrite:
        raise ConfigError(f"{path}: baseline exists; pass --qrobust-overwrite-baseline to replace it")


class Comparison:
    """The saved baseline a run is compared with: its value for a check, and why it cannot be compared
    (recorded in another environment) unless ``any_env``."""

    def __init__(self, path: str | Path, any_env: bool = False):
        self.path, self.any_env = path, any_env
        self.document = load_baseline(path)

    def value(self, pair: str, perturbation: str, level: float, metric: str) -> float | None:
        """The saved value to compare with, or None (no entry for this check)."""
        return self.document["values"].get(case_key({"pair": pair, "perturbation": perturbation, "level": level,
                                                     "metric": metric}))

    def mismatch(self, current: dict) -> str | None:
        """Why the baseline cannot be compared with a run of fingerprint ``current``, or None."""
        diff = {} if self.any_env else environment_mismatch(current, self.document)
        if not diff:
            return None
        return (f"baseline {self.path} was recorded in another environment ({show(diff, 300)}); pass "
                "--qrobust-baseline-any-env to compare anyway")


def load_baseline(path: str | Path) -> dict:
    """A saved baseline; every value must be a finite number (a NaN would disable its comparison)."""
    try:
        data = json.loads(read_bounded(path, "baseline", MAX_BYTES).decode("utf-8"))
    except InvalidArgument as exc:
        raise ConfigError(str(exc)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: baseline is not valid JSON ({show(str(exc), 120)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("values"), dict) or not isinstance(data.get("fingerprint"), dict):
        raise ConfigError(f"{path}: baseline lacks 'fingerprint' and 'values' objects")
    for key, value in data["values"].items():
        if not is_number(value) or not math.isfinite(value):
            raise ConfigError(f"{path}: values.{show(key)}: expected a finite number, got {show(value)}")
        if key.rsplit("|", 1)[-1] not in METRICS:
            raise ConfigError(f"{path}: values.{show(key)}: not a 'pair|perturbation|level|metric' key")
    return data


def regression(metric: str, old: float, new: float, margin: BaselineMargin) -> str | None:
    """A message when ``new`` is worse than ``old`` by more than the margin allows, else None."""
    worse = (old - new) if METRICS[metric].higher_is_better else (new - old)
    allowed = margin.allowed(old)
    if worse > allowed:
        return (f"{metric} regressed from baseline {old:.4g} to {new:.4g} (by {worse:.4g}, "
                f"allowed {margin.describe()} = {allowed:.4g})")
    return None


def environment_mismatch(current: dict, baseline: dict) -> dict:
    """Fingerprint entries that differ: {key: (baseline, current)}."""
    recorded = baseline["fingerprint"]
    return {k: (recorded.get(k), v) for k, v in current.items() if recorded.get(k) != v}
