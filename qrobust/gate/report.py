"""Session report (JSON + self-contained HTML) and baselines, always written atomically.

``report.json`` follows ``REPORT_SCHEMA`` (JSON Schema, draft 2020-12): ``environment``, ``cases`` (one
object per pair x perturbation x level x metric) and ``forward_passes``. ``report.html`` plots each
metric against the level (FP32 and quantized accuracy side by side, like seed 004's figures) and lists
every failing case first.
"""
from __future__ import annotations

import html
import json
import platform
import subprocess
import sys
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from qrobust._files import remove_stale, write_set

VERDICTS = ("pass", "fail", "inconclusive", "xfail", "measured")  # measured: reported, no tolerance set
SCHEMA_ID = "urn:qrobust:report:1"
SCHEMA_VERSION = 1

REPORT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$id": SCHEMA_ID,
    "required": ["schema_version", "qrobust_version", "run_id", "timestamp", "command", "environment", "cases",
                 "forward_passes", "summary"],
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
                "verdict": {"enum": list(VERDICTS)}, "direction": {"enum": ["<=", ">="]},
                "fragile": {"type": "boolean"}, "test": {"type": "string"},
            },
        }},
        "forward_passes": {"type": "object"},
        "summary": {"type": "object", "required": ["total", "pass", "fail", "inconclusive", "xfail"]},
    },
}


def environment(*, seed: int, decision: str, thresholds_sha256: str | None, weights: dict[str, str],
                pairs: dict[str, dict]) -> dict:
    """The run's environment; ``pairs`` holds each pair's provenance (recipe, engine, CAM layers, data)."""
    import torch
    import torchvision

    return {
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "machine": platform.machine(), "python": platform.python_version(), "seed": seed, "decision": decision,
        "thresholds_sha256": thresholds_sha256, "weights": dict(sorted(weights.items())),
        "pairs": dict(sorted(pairs.items())),
    }


def summarize(cases: list[dict]) -> dict:
    counts = {v: sum(c["verdict"] == v for c in cases) for v in VERDICTS}
    return {"total": len(cases), **counts, "fragile": sum(bool(c.get("fragile")) for c in cases)}


def build_report(cases: list[dict], env: dict, forward_passes: dict, run_id: str,
                 command: list[str] | None = None) -> dict:
    import qrobust

    cases = sorted(cases, key=lambda c: (c["pair"], c["perturbation"], c["level"], c["metric"], c["test"]))
    return {"$schema": SCHEMA_ID, "schema_version": SCHEMA_VERSION, "qrobust_version": qrobust.__version__,
            "run_id": run_id, "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command or [Path(sys.argv[0]).name, *sys.argv[1:]], "git_commit": _git_commit(),
            "environment": env, "summary": summarize(cases), "cases": cases, "forward_passes": forward_passes}


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
    failed = [c for c in report["cases"] if c["verdict"] in ("fail", "inconclusive")]
    fragile = [c for c in report["cases"] if c.get("fragile") and c["verdict"] == "pass"]
    lines = [f"## qrobust gate: {'FAILED' if failed else 'PASSED'}", "",
             f"{s['total']} checks: {s['pass']} pass, {s['fail']} fail, {s['inconclusive']} inconclusive, "
             f"{s['xfail']} expected failures caught, {s['fragile']} fragile "
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
        lines.append(f"| {_md(pair)} | {metric} | {_fmt(c['value'])} | {c['direction']} {_fmt(c['tolerance'])} | "
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
    cause = c.get("failed_by") or c["verdict"]
    return (f"| {_md(c['pair'])} / {_md(c['perturbation'])} @ {c['level']:g} {c['metric']} | {_fmt(c['value'])} | "
            f"{c['direction']} {_fmt(c['tolerance'])} | {interval} | {c['n']} | {cause} |")


def worst_cases(cases: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (pair, metric), the judged case closest to (or furthest past) its tolerance: the smallest
    recorded margin. Expected failures and untoleranced measurements are not judged."""
    worst: dict[tuple[str, str], dict] = {}
    for c in cases:
        if c["margin"] is None or c["verdict"] in ("xfail", "measured"):
            continue
        key = (c["pair"], c["metric"])
        if key not in worst or c["margin"] < worst[key]["margin"]:
            worst[key] = c
    return dict(sorted(worst.items()))


# ---- HTML ------------------------------------------------------------------------------------------
def _svg_chart(title: str, series: dict[str, list[tuple[float, float]]], tolerance: float | None = None,
               width=300, height=170) -> str:
    """A small self-contained line chart (no JavaScript, no external assets); dashed line = tolerance."""
    points = [p for s in series.values() for p in s if p[1] is not None]
    if len({p[0] for p in points}) < 2:
        return ""
    ys = [p[1] for p in points] + ([tolerance] if tolerance is not None else [])
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5 * (abs(y0) or 1), y1 + 0.5 * (abs(y1) or 1)
    left, bottom = 52, 30
    sx = lambda x: left + (x - x0) / (x1 - x0) * (width - left - 10)  # noqa: E731
    sy = lambda y: height - bottom + (y0 - y) / (y1 - y0) * (height - bottom - 20)  # noqa: E731
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<text x="{width / 2}" y="13" text-anchor="middle" font-size="12">{html.escape(title)}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - 10}" y2="{height - bottom}" stroke="#888"/>',
             f'<line x1="{left}" y1="20" x2="{left}" y2="{height - bottom}" stroke="#888"/>',
             f'<text x="{left - 3}" y="{sy(y1) + 4}" text-anchor="end" font-size="9">{y1:.3g}</text>',
             f'<text x="{left - 3}" y="{sy(y0) + 4}" text-anchor="end" font-size="9">{y0:.3g}</text>',
             f'<text x="{sx(x0)}" y="{height - bottom + 11}" text-anchor="middle" font-size="9">{x0:g}</text>',
             f'<text x="{sx(x1)}" y="{height - bottom + 11}" text-anchor="middle" font-size="9">{x1:g}</text>']
    if tolerance is not None:
        parts.append(f'<line x1="{left}" y1="{sy(tolerance):.1f}" x2="{width - 10}" y2="{sy(tolerance):.1f}" '
                     f'stroke="#999" stroke-dasharray="4 3"/>')
    for i, (name, pts) in enumerate(series.items()):
        pts = sorted(p for p in pts if p[1] is not None)
        colour = colours[i % len(colours)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>')
        parts.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2" fill="{colour}"/>' for x, y in pts)
        parts.append(f'<text x="{left + 6 + 80 * i}" y="{height - 5}" font-size="10" fill="{colour}">'
                     f'{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.4g}"


CHART_METRICS = ("top1_delta", "agreement", "kl_mean", "cam_sim")


def _summary_rows(cases: list[dict]) -> str:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for c in cases:
        groups[(c["pair"], c["metric"])].append(c)
    worst_of = worst_cases(cases)
    rows = []
    for (pair, metric), group in sorted(groups.items()):
        worst = worst_of.get((pair, metric))
        bad = sum(c["verdict"] in ("fail", "inconclusive") for c in group)
        caught = sum(c["verdict"] == "xfail" for c in group)
        where = "—" if worst is None else f"{worst['perturbation']} @ {worst['level']:g}"
        css = "fail" if bad else ("xfail" if caught else "pass")
        rows.append(f'<tr class="{css}"><td>{html.escape(pair)}</td><td>{metric}</td><td>{len(group)}</td><td>{bad}</td>'
                    f'<td>{caught}</td><td>{_fmt(worst and worst["value"])}</td><td>{where}</td>'
                    f'<td>{_fmt(worst and worst["tolerance"])}</td></tr>')
    return "".join(rows)


def render_html(report: dict) -> str:
    cases, env, summary = report["cases"], report["environment"], report["summary"]
    curves: dict[tuple[str, str], dict[str, dict[float, float]]] = defaultdict(lambda: defaultdict(dict))
    tolerances: dict[tuple[str, str, str], float] = {}
    for c in cases:
        key = (c["pair"], c["perturbation"])
        curves[key][c["metric"]][c["level"]] = c["value"]
        tolerances[(*key, c["metric"])] = c["tolerance"]
        for name, value in (c.get("context") or {}).items():
            curves[key][name][c["level"]] = value
    rows = []
    for c in sorted(cases, key=lambda c: (c["verdict"] == "pass", c["verdict"] == "xfail", c["pair"],
                                          c["perturbation"], c["level"], c["metric"])):
        interval = "—" if c["interval"] is None else f"[{c['interval'][0]:.4g}, {c['interval'][1]:.4g}]"
        rows.append(f'<tr class="{c["verdict"]}"><td>{html.escape(c["pair"])}</td><td>{html.escape(c["perturbation"])}'
                    f'</td><td>{c["level"]:g}</td><td>{c["metric"]}</td><td>{_fmt(c["value"])}</td><td>{interval}</td>'
                    f'<td>{c["n"]}</td><td>{c["direction"]} {_fmt(c["tolerance"])}</td><td>{c["verdict"]}'
                    f'{" (fragile)" if c.get("fragile") else ""}</td></tr>')
    charts = []
    for (pair, pert), metrics in sorted(curves.items()):
        svgs = []
        if "top1_fp32" in metrics:
            svgs.append(_svg_chart("top-1 accuracy", {"FP32": list(metrics["top1_fp32"].items()),
                                                      "quantized": list(metrics["top1_quant"].items())}))
        svgs += [_svg_chart(m, {m: list(metrics[m].items())}, tolerances.get((pair, pert, m)))
                 for m in CHART_METRICS if m in metrics]
        if any(svgs):
            charts.append(f"<div class='block'><h3>{html.escape(pair)} — {html.escape(pert)}</h3>{''.join(svgs)}</div>")
    env_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(json.dumps(v))}</td></tr>" for k, v in env.items())
    failed = summary["fail"] or summary["inconclusive"]
    run = html.escape(str(report.get("run_id", "")))
    return f"""<!doctype html><html><head><meta charset="utf-8"><meta name="qrobust-run" content="{run}">
<title>qrobust report</title><style>
body{{font-family:sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left}} tr.fail td{{background:#fdd}}
tr.inconclusive td{{background:#ffd}} tr.xfail td{{background:#eef}} .block{{display:inline-block;vertical-align:top;
margin:6px;border:1px solid #eee}} .block h3{{font-size:13px;margin:4px}} img{{image-rendering:pixelated}}
</style></head><body><h1>qrobust gate: {"FAILED" if failed else "PASSED"}</h1><p>run {run}</p>
<p>{summary['total']} checks: {summary['pass']} pass, {summary['fail']} fail, {summary['inconclusive']} inconclusive,
{summary['xfail']} expected failures (known-bad configurations the gate must catch). Decision mode:
<b>{html.escape(str(env.get('decision')))}</b>. Deltas are FP32 minus quantized (positive = quantized worse);
intervals are 95%; dashed lines in the charts are tolerances.</p>
<h2>Summary: the worst case of every pair and metric</h2><table><tr><th>pair</th><th>metric</th><th>checks</th>
<th>failed</th><th>expected failures</th><th>worst value</th><th>at</th><th>tolerance</th></tr>
{_summary_rows(cases)}</table>
{_diagnosis_section(cases)}{_flipped_section(cases)}
<h2>Metrics against perturbation level</h2>{''.join(charts)}
<details{" open" if failed else ""}><summary><b>All {len(cases)} checks (failures first)</b></summary>
<table><tr><th>pair</th><th>perturbation</th><th>level</th><th>metric</th><th>value</th><th>95% interval</th>
<th>n</th><th>tolerance</th><th>verdict</th></tr>{''.join(rows)}</table></details>
<h2>Environment</h2><table>{env_rows}</table>
<h2>Forward passes</h2><pre>{html.escape(json.dumps(report['forward_passes'], indent=1))}</pre></body></html>"""


def _flipped_section(cases: list[dict], per_case: int = 5, max_cases: int = 10) -> str:
    """A few samples whose top-1 changed, per failing accuracy case, with both models' top-3."""
    rows, seen = [], set()
    for c in cases:
        key = (c["pair"], c["perturbation"], c["level"])
        flipped = c["details"].get("flipped") if c["verdict"] in ("fail", "inconclusive") else None
        if not flipped or key in seen or len(seen) >= max_cases:
            continue
        seen.add(key)
        for f in flipped[:per_case]:
            tops = {m: ", ".join(f"{cls} ({p:.2f})" for cls, p in f[m]) for m in ("fp32", "quantized")}
            rows.append(f"<tr><td>{html.escape(c['pair'])} / {html.escape(c['perturbation'])} @ {c['level']:g}</td>"
                        f"<td>{html.escape(str(f.get('sample', f['id'])))}</td><td>{f['label']}</td>"
                        f"<td>{html.escape(tops['fp32'])}</td><td>{html.escape(tops['quantized'])}</td></tr>")
    if not rows:
        return ""
    return ("<h2>Samples whose prediction changed (failing accuracy cases)</h2><table><tr><th>case</th><th>sample</th>"
            f"<th>label</th><th>FP32 top-3 (probability)</th><th>quantized top-3</th></tr>{''.join(rows)}</table>")


def _diagnosis_section(cases: list[dict]) -> str:
    """Per failing case, its worst layers and a bar per quantized layer (SQNR in dB, execution order)."""
    seen, blocks = set(), []
    for c in cases:
        d = c.get("diagnosis")
        key = (c["pair"], c["perturbation"], c["level"])
        if not d or key in seen:
            continue
        seen.add(key)
        layers = d["layers"]
        worst = {w.split(" (")[0] for w in d["line"].removeprefix("worst layers: ").split("), ")}
        bar_h, width = 12, 360
        top = max([r["sqnr_db"] for r in layers if isinstance(r["sqnr_db"], (int, float))] + [1.0])
        bars = []
        for i, r in enumerate(layers):
            value = r["sqnr_db"] if isinstance(r["sqnr_db"], (int, float)) else top
            w = max(1.0, width * max(0.0, value) / top)
            colour = "#d62728" if r["layer"] in worst else "#7f7f7f"
            bars.append(f'<rect x="170" y="{i * bar_h}" width="{w:.0f}" height="{bar_h - 2}" fill="{colour}"/>'
                        f'<text x="165" y="{i * bar_h + 9}" font-size="9" text-anchor="end">{html.escape(r["layer"])}</text>'
                        f'<text x="{174 + w:.0f}" y="{i * bar_h + 9}" font-size="9">{value:.1f} dB</text>')
        svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 230}" height="{len(layers) * bar_h + 4}" '
               f'role="img" aria-label="per-layer SQNR">{"".join(bars)}</svg>')
        blocks.append(f"<div class='block'><h3>{html.escape(c['pair'])} — {html.escape(c['perturbation'])} @ "
                      f"{c['level']:g}</h3><p>{html.escape(d['line'])}; SQNR per quantized layer on the "
                      f"{len(d['samples'])} most different samples (red: where the error enters)</p>{svg}</div>")
    if not blocks:
        return ""
    return "<h2>Diagnosis of failing cases: where the twin loses the signal</h2>" + "".join(blocks)


def overlay_png(pixels, cam_map, size: int = 128) -> str:
    """A PNG data URI: the image, with the CAM blended on top in a jet colour map when given."""
    import base64
    import io

    import torch
    from PIL import Image

    img = pixels.detach().float().cpu()
    img = img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]
    if cam_map is not None:
        m = cam_map.detach().float().cpu().clamp(0, 1)
        jet = torch.stack([(1.5 - (4 * m - c).abs()).clamp(0, 1) for c in (3, 2, 1)])
        img = 0.5 * img + 0.5 * jet
    scale = max(1, size // max(img.shape[-2:]))
    img = img.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    array = (img.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _overlay_section(overlays: list[dict]) -> str:
    if not overlays:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(o['pair'])}<br>{html.escape(o['perturbation'])} @ {o['level']:g}<br>sample {o['id']}"
        f"<br>{o['method']}, RMSE {o['rmse']:.3f}</td><td><img src='{o['image']}'></td><td><img src='{o['fp32']}'>"
        f"</td><td><img src='{o['quantized']}'></td></tr>" for o in sorted(overlays, key=lambda o: -o["rmse"]))
    return ("<h2>Where the maps differ most (CAM RMSE)</h2><table><tr><th>case</th><th>input</th><th>FP32 CAM</th>"
            f"<th>quantized CAM</th></tr>{rows}</table>")


def write_report(directory: str | Path, report: dict, overlays: list[dict] = (),
                 baseline: tuple[Path, str] | None = None) -> tuple[Path, Path]:
    """report.json and report.html (and a baseline file, when given as (path, text)) written as one set:
    every file is staged first, then renamed, report.json last, so a failure leaves the previous set in
    place; all carry the run id (a run killed between renames leaves files whose ids differ from
    report.json's). Temporary files of killed runs are removed first."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale(directory)
    json_path, html_path = directory / "report.json", directory / "report.html"
    html_text = render_html(report).replace("<h2>Environment</h2>",
                                            _overlay_section(list(overlays)) + "<h2>Environment</h2>")
    files = {html_path: html_text}
    if baseline is not None:
        remove_stale(baseline[0].parent)
        files[baseline[0]] = baseline[1]
    files[json_path] = json.dumps(report, indent=1, sort_keys=True)  # renamed last: the set's commit mark
    write_set(files)
    return json_path, html_path
