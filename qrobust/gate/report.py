"""Session report (JSON + self-contained HTML) and baselines, always written atomically.

``report.json`` follows ``REPORT_SCHEMA`` (JSON Schema, draft 2020-12): ``environment``, ``cases`` (one
object per pair x perturbation x level x metric) and ``forward_passes``; ``report.html`` is rendered
from it by ``qrobust.gate.html_report``. The Markdown page for pull requests is built here too.
"""
from __future__ import annotations

import html
import json
import platform
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from qrobust._files import remove_stale, write_set
from qrobust.gate.html_report import fmt, render_html
from qrobust.gate.verdict import VERDICTS, fails, worst_cases

SCHEMA_ID = "urn:qrobust:report:1"
SCHEMA_VERSION = 1

REPORT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$id": SCHEMA_ID,
    "required": ["schema_version", "qrobust_version", "run_id", "timestamp", "command", "environment", "cases",
                 "forward_passes", "summary", "passed"],
    "properties": {
        "environment": {
            "type": "object",
            "required": ["torch", "torchvision", "cpu_capability", "threads", "seed", "thresholds_sha256",
                         "weights", "pairs", "decision"],
        },
        "cases": {"type": "array", "items": {
            "type": "object",
            "required": ["test", "pair", "perturbation", "level", "metric", "direction", "value", "interval", "n",
                         "tolerance", "verdict", "fragile"],
            "properties": {
                "pair": {"type": "string"}, "perturbation": {"type": "string"}, "level": {"type": "number"},
                "metric": {"type": "string"}, "value": {"type": ["number", "null"]},
                "interval": {"oneOf": [{"type": "null"},
                                       {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}]},
                "n": {"type": "integer", "minimum": 0}, "tolerance": {"type": ["number", "null"]},
                "verdict": {"enum": list(VERDICTS)}, "direction": {"enum": ["<=", ">=", None]},
                "fragile": {"type": "boolean"}, "test": {"type": "string"}, "error": {"type": "string"},
            },
        }},
        "forward_passes": {"type": "object"},
        "summary": {"type": "object", "required": ["total", "pass", "fail", "inconclusive", "xfail", "error", "failing"]},
        "passed": {"type": "boolean"},
        "not_applicable": {"type": "array", "items": {"type": "object", "required": ["pair", "metric", "reason"]}},
    },
}


def environment(*, seed: int, decision: str, thresholds_sha256: str | None, weights: dict[str, str],
                pairs: dict[str, dict]) -> dict:
    """The run's environment; ``pairs`` holds each pair's provenance (recipe, engine, CAM layers, data)."""
    import torch
    import torchvision

    from qrobust.quant.convert import cpu_features

    return {
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_features": cpu_features(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(), "python": platform.python_version(), "seed": seed, "decision": decision,
        "thresholds_sha256": thresholds_sha256, "weights": dict(sorted(weights.items())),
        "pairs": dict(sorted(pairs.items())),
    }


def summarize(cases: list[dict]) -> dict:
    """Counts per verdict, and ``failing``: the checks that fail the gate (qrobust.gate.verdict.fails)."""
    counts = {v: sum(c["verdict"] == v for c in cases) for v in VERDICTS}
    return {"total": len(cases), **counts, "fragile": sum(bool(c.get("fragile")) for c in cases),
            "failing": sum(fails(c) for c in cases)}


def build_report(cases: list[dict], env: dict, forward_passes: dict, run_id: str,
                 command: list[str] | None = None, *, thresholds_path: str | None = None,
                 duration_s: float | None = None, not_applicable: list[dict] = ()) -> dict:
    """The report.json document; ``thresholds_path`` and ``duration_s`` are the HTML page's provenance.
    ``passed`` is the run's verdict, from its records alone: every headline reads it."""
    import qrobust

    cases = sorted(cases, key=lambda c: (c["pair"], c["perturbation"], c["level"], c["metric"], c["test"]))
    summary = summarize(cases)
    return {"$schema": SCHEMA_ID, "schema_version": SCHEMA_VERSION, "qrobust_version": qrobust.__version__,
            "run_id": run_id, "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command or [Path(sys.argv[0]).name, *sys.argv[1:]], "git_commit": _git_commit(),
            "thresholds_path": thresholds_path, "duration_s": duration_s, "environment": env,
            "passed": summary["failing"] == 0, "summary": summary, "cases": cases,
            "not_applicable": list(not_applicable), "forward_passes": forward_passes}


def _git_commit() -> str | None:
    """The commit of the working directory's repository, when there is one (provenance of the run)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def render_markdown(report: dict, html_path: Path | None = None) -> str:
    """A PR-ready page: the verdict, each failure with its reason, the worst case per pair and metric,
    fragile verdicts, and where the full report is."""
    s = report["summary"]
    failed = [c for c in report["cases"] if c["verdict"] in ("fail", "inconclusive", "error")]
    fragile = [c for c in report["cases"] if c.get("fragile") and c["verdict"] == "pass"]
    lines = [f"## qrobust gate: {'PASSED' if report['passed'] else 'FAILED'}", "",
             f"{s['total']} checks: {s['pass']} pass, {s['fail']} fail, {s['error']} error, {s['inconclusive']} "
             f"inconclusive, {s['xfail']} expected failures caught, {s['fragile']} fragile "
             f"(decision {report['environment']['decision']}, seed {report['environment']['seed']}, run {report['run_id']})", ""]
    if failed:
        lines += ["### Failures", "", "| check | value | tolerance | 95% interval | n | cause |", "|---|---|---|---|---|---|"]
        lines += [_markdown_row(c) for c in failed[:50]]
        if len(failed) > 50:
            lines.append(f"| ... {len(failed) - 50} more in the HTML report | | | | | |")
        lines.append("")
    lines += ["### Worst case per pair and metric", "", "| pair | metric | worst | tolerance | at | verdict |",
              "|---|---|---|---|---|---|"]
    for (pair, metric), c in worst_cases(report["cases"]).items():
        lines.append(f"| {_md(pair)} | {metric} | {fmt(c['value'])} | {c['direction']} {fmt(c['tolerance'])} | "
                     f"{_md(c['perturbation'])} @ {c['level']:g} | {c['verdict']}{' (fragile)' if c.get('fragile') else ''} |")
    if fragile:
        lines += ["", f"{len(fragile)} passing verdicts are fragile (at most 2 samples or 0.1 interval widths from "
                      "reversing): read them with their intervals."]
    if html_path is not None:
        lines += ["", f"Full report: `{html_path}`"]
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return html.escape(str(text)).replace("|", "\\|")


def _markdown_row(c: dict) -> str:
    interval = "—" if c["interval"] is None else f"[{c['interval'][0]:.4g}, {c['interval'][1]:.4g}]"
    cause = _md(c["error"]) if c.get("error") else c.get("failed_by") or c["verdict"]
    return (f"| {_md(c['pair'])} / {_md(c['perturbation'])} @ {c['level']:g} {c['metric']} | {fmt(c['value'])} | "
            f"{c['direction'] or ''} {fmt(c['tolerance'])} | {interval} | {c['n']} | {cause} |")


def write_report(directory: str | Path, report: dict, overlays: Sequence[dict] = (),
                 baseline: tuple[Path, str] | None = None) -> tuple[Path, Path]:
    """report.json and report.html (``overlays``: CAM thumbnails per case, see ``html_report``), and a
    baseline file when given as (path, text), written as one set:
    every file is staged first, then renamed, report.json last, so a failure leaves the previous set in
    place; all carry the run id (a run killed between renames leaves files whose ids differ from
    report.json's). Temporary files of killed runs are removed first."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale(directory)
    json_path, html_path = directory / "report.json", directory / "report.html"
    files: dict[Path, str | bytes] = {html_path: render_html(report, overlays)}
    if baseline is not None:
        remove_stale(baseline[0].parent)
        files[baseline[0]] = baseline[1]
    files[json_path] = json.dumps(report, indent=1, sort_keys=True)  # renamed last: the set's commit mark
    write_set(files)
    return json_path, html_path
