"""report.html: the report dict (and CAM overlays) turned into one self-contained page.

The page is rendered through a Jinja2 template (``templates/report.html.j2``, autoescaped) that a user
can replace (``render_html(..., template=path)`` or ``$QROBUST_REPORT_TEMPLATE``); this module builds the
template's context: failures first with their decisive comparison, what the expected failures caught,
the worst case per pair and metric, charts per pair and perturbation, every check (level 0 once per
pair: it is evaluated once), and the run's provenance. Nothing on the page loads from the network.
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from markupsafe import Markup

from qrobust.gate.charts import Series, level_chart
from qrobust.gate.verdict import describe_fragility, worst_cases

TEMPLATE_ENV = "QROBUST_REPORT_TEMPLATE"  # path of a user's Jinja2 template replacing the shipped one
BAD = ("error", "fail", "inconclusive")
SEVERITY = {"error": 0, "fail": 1, "inconclusive": 2, "xfail": 3, "pass": 4, "measured": 5}
CHART_METRICS = ("agreement", "kl_mean", "cam_sim")  # charted for every pair and perturbation
MAX_CARDS = 40  # failing cases shown in full; the rest are in the table of every check
OVERLAYS_PER_CASE = 2


def render_html(report: dict, overlays: Sequence[dict] = (), template: str | Path | None = None) -> str:
    """The page for ``report``; ``overlays`` are CAM thumbnails from ``overlay_thumbnails`` (one per case)."""
    import jinja2

    path = template or os.environ.get(TEMPLATE_ENV)
    if path:
        loader: jinja2.BaseLoader = jinja2.FileSystemLoader(str(Path(path).parent))
        name = Path(path).name
    else:
        loader, name = jinja2.PackageLoader("qrobust.gate", "templates"), "report.html.j2"
    env = jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = fmt
    env.filters["sign"] = {">=": "≥", "<=": "≤"}.get
    return env.get_template(name).render(**context(report, list(overlays)))


def fmt(value) -> str:
    return "—" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def context(report: dict, overlays: list[dict]) -> dict:
    """Everything the template shows, precomputed (the template only lays it out)."""
    cases = report["cases"]
    unique = unique_cases(cases)
    counts = {v: sum(c["verdict"] == v for c in unique) for v in SEVERITY}
    by_case = _overlays_by_case(overlays)
    bad = [c for c in unique if c["verdict"] in BAD]
    cards = _cards(cases, bad, by_case)
    pairs = sorted({c["pair"] for c in cases}, key=lambda p: (_pair_rank(p, unique), p))
    return {
        "report": report, "run_id": report.get("run_id", ""), "failed": not report["passed"], "counts": counts,
        "checks": len(unique), "repeats": len(cases) - len(unique), "cards": cards,
        "more_failures": max(0, len({_key(c) for c in bad}) - len(cards)),
        "caught": _caught(unique), "summary": _summary(unique), "charts": _charts(cases, pairs),
        "row_groups": [(p, sorted((c for c in unique if c["pair"] == p), key=_row_order)) for p in pairs],
        "pairs": pairs, "verdicts": [v for v in SEVERITY if counts[v]],
        "spotlight": _spotlight(overlays, unique), "colour_bar": Markup(COLOUR_BAR),
        "provenance": provenance(report), "fragile": sum(bool(c.get("fragile")) for c in unique),
    }


def unique_cases(cases: list[dict]) -> list[dict]:
    """Level 0 is the clean input: evaluated once per pair, recorded under every perturbation. Keep one
    (shown as perturbation ``clean``) so counts and tables do not repeat it."""
    out, seen = [], set()
    for c in cases:
        if c["level"] == 0:
            key = (c["test"].split("[")[0], c["pair"], c["metric"])  # the test function, not its parameters
            if key in seen:
                continue
            seen.add(key)
            c = {**c, "perturbation": "clean"}
        out.append(c)
    return out


def comparison(c: dict) -> str:
    """The decisive comparison: ``agreement 0.9244 < 0.95`` for a violated tolerance, ``0.998 >= 0.95``
    for a met one (an expected failure's test may fail on another metric). Digits are added until the
    value no longer reads as the tolerance."""
    if c["verdict"] == "error":
        return f"{c['metric'] or 'the gate'} could not be judged: {c.get('error', '')}"
    if c["value"] is None:
        return f"{c['metric']} not computable"
    if c["tolerance"] is None:
        return f"{c['metric']} {fmt(c['value'])} (measured)"
    value, digits = c["value"], 4
    while f"{value:.{digits}g}" == f"{c['tolerance']:.{digits}g}" and value != c["tolerance"] and digits < 10:
        digits += 2
    shown = f"{value:.{digits}g}"
    if c["verdict"] == "inconclusive":
        return f"{c['metric']} {shown} {c['direction']} {c['tolerance']:g} unproven"
    if c.get("failed_by") == "baseline" and c["verdict"] == "fail":
        return f"{c['metric']} {shown} regressed from baseline {fmt((c['baseline'] or {}).get('value'))}"
    violated = c["margin"] is not None and c["margin"] < 0
    sign = {">=": "<", "<=": ">"}[c["direction"]] if violated else c["direction"]
    return f"{c['metric']} {shown} {sign} {c['tolerance']:g}"


def _key(c: dict) -> tuple:
    return c["pair"], c["perturbation"], c["level"]


def _row_order(c: dict) -> tuple:
    return SEVERITY[c["verdict"]], c["perturbation"] != "clean", c["perturbation"], c["level"], c["metric"]


def _pair_rank(pair: str, unique: list[dict]) -> int:
    return min((SEVERITY[c["verdict"]] for c in unique if c["pair"] == pair), default=9)


def _facts(c: dict) -> list[tuple[str, str]]:
    """The numbers a reader acts on: interval, n, discordant pairs, fragility, cause."""
    d = c.get("details") or {}
    facts = [("95% interval", "—" if c["interval"] is None else f"[{fmt(c['interval'][0])}, {fmt(c['interval'][1])}]"),
             ("n", str(c["n"]))]
    if "b" in d and "c" in d:
        facts.append(("b / c", f"{d['b']} / {d['c']}"))
    if "mcnemar_p" in d:
        facts.append(("McNemar p", fmt(d["mcnemar_p"])))
    fragile = describe_fragility(c)
    if fragile:
        facts.append(("fragility", fragile + (" (fragile)" if c.get("fragile") else "")))
    if c.get("failed_by"):
        facts.append(("failed by", c["failed_by"]))
    if c.get("note"):
        facts.append(("note", c["note"]))
    return facts


def _cards(cases: list[dict], bad: list[dict], by_case: dict) -> list[dict]:
    """One card per failing pair x perturbation x level: its failing metrics with their comparison and
    numbers, each metric's chart, the per-layer diagnosis, the changed predictions, the CAM overlays."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in sorted(bad, key=lambda c: (SEVERITY[c["verdict"]], c["margin"] if c["margin"] is not None else -math.inf)):
        groups[_key(c)].append(c)
    curves = _curves(cases)
    cards = []
    for key, group in list(groups.items())[:MAX_CARDS]:
        pair, pert, level = key
        chart_pert = pert if pert != "clean" else next((c["perturbation"] for c in cases if c["pair"] == pair), pert)
        first = group[0]
        cards.append({
            "id": _anchor("case", pair, pert, level), "pair": pair, "perturbation": pert, "level": level,
            "unit": perturbation_unit(pert), "checks": [{**c, "comparison": comparison(c), "facts": _facts(c)} for c in group],
            "charts": [Markup(_metric_chart(curves, pair, chart_pert, c["metric"])) for c in group[:3]],
            "diagnosis": _diagnosis(group), "flipped": _flipped(group),
            "overlays": by_case.get(key, [])[:OVERLAYS_PER_CASE], "context": first.get("context") or {},
        })
    return cards


def _caught(unique: list[dict]) -> list[dict]:
    """Per expected-failure pair and metric, the worst value the gate caught (what the xfail proves); a
    metric the known-bad twin meets everywhere is not a catch."""
    caught = [c for c in unique if c["verdict"] == "xfail" and c["margin"] is not None and c["margin"] < 0]
    worst = worst_cases(caught, keep=lambda c: True)
    rows = [{**c, "comparison": comparison(c), "count": sum((u["pair"], u["metric"]) == k for u in caught)}
            for k, c in worst.items()]
    return sorted(rows, key=lambda c: (c["pair"], c["margin"]))


def _summary(unique: list[dict]) -> list[dict]:
    """The worst case of every pair and metric (an expected failure's worst caught value included),
    failures first."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for c in unique:
        groups[(c["pair"], c["metric"])].append(c)
    rows = []
    for group in groups.values():
        judged = [c for c in group if c["margin"] is not None and c["verdict"] != "measured"]
        if not judged:
            continue
        worst = min(judged, key=lambda c: (SEVERITY[c["verdict"]] if c["verdict"] in BAD else 5, c["margin"]))
        rows.append({**worst, "comparison": comparison(worst), "checks": len(group),
                     "bad": sum(c["verdict"] in BAD for c in group), "caught": sum(c["verdict"] == "xfail" for c in group)})
    return sorted(rows, key=lambda r: (SEVERITY[r["verdict"]], -r["bad"], r["pair"], r["metric"]))


def _curves(cases: list[dict]) -> dict[tuple[str, str, str], dict[float, dict]]:
    """(pair, perturbation, metric) -> level -> case: one tolerance, interval and verdict per level."""
    curves: dict[tuple[str, str, str], dict[float, dict]] = defaultdict(dict)
    for c in cases:
        curves[(c["pair"], c["perturbation"], c["metric"])][c["level"]] = c
    return curves


def _metric_chart(curves: dict, pair: str, pert: str, metric: str) -> str:
    points = curves.get((pair, pert, metric), {})
    series = Series(metric, {x: c["value"] for x, c in points.items()},
                    band={x: tuple(c["interval"]) for x, c in points.items() if c["interval"]},
                    marks={x: c["verdict"] for x, c in points.items()})
    direction = next((c["direction"] for c in points.values()), "")
    return level_chart(f"{metric} — {pert}", x_title(pert), f"{metric} ({metric_unit(metric)})", [series],
                       {x: c["tolerance"] for x, c in points.items()}, direction)


def _charts(cases: list[dict], pairs: list[str]) -> list[dict]:
    """Per pair (failing pairs first) and perturbation: FP32 and quantized top-1 accuracy, the default
    metrics, and every metric that is not a pass at some level."""
    curves = _curves(cases)
    out = []
    for pair in pairs:
        perts = sorted({p for (q, p, _) in curves if q == pair})
        blocks = []
        for pert in perts:
            metrics = sorted({m for (q, p, m) in curves if (q, p) == (pair, pert)})
            shown = [m for m in metrics if m in CHART_METRICS or any(
                c["verdict"] in (*BAD, "xfail") for c in curves[(pair, pert, m)].values())]
            svgs = [_accuracy_chart(curves, pair, pert, metrics)] + [_metric_chart(curves, pair, pert, m) for m in shown]
            if any(svgs):
                blocks.append({"perturbation": pert, "svgs": [Markup(s) for s in svgs if s]})
        out.append({"pair": pair, "id": _anchor("pair", pair), "blocks": blocks})
    return out


def _accuracy_chart(curves: dict, pair: str, pert: str, metrics: list[str]) -> str:
    if not metrics:
        return ""
    points = curves[(pair, pert, metrics[0])]
    context = {x: c.get("context") or {} for x, c in points.items()}
    if not any("top1_fp32" in v for v in context.values()):
        return ""
    return level_chart(f"top-1 accuracy — {pert}", x_title(pert), "top-1 accuracy (fraction)",
                       [Series("FP32", {x: v.get("top1_fp32") for x, v in context.items()}),
                        Series("quantized", {x: v.get("top1_quant") for x, v in context.items()})])


def perturbation_unit(name: str) -> str:
    """What a level means, from the perturbation registry (``level`` for one it does not know)."""
    from qrobust.data.perturbations import PERTURBATIONS

    return PERTURBATIONS.get(name).unit if name in PERTURBATIONS else "level"


def x_title(pert: str) -> str:
    return f"{pert}: {perturbation_unit(pert)}"


def metric_unit(metric: str) -> str:
    from qrobust.metrics.catalog import METRICS

    return METRICS[metric].unit if metric in METRICS else "score"


def _anchor(*parts) -> str:
    return "-".join("".join(ch if ch.isalnum() else "_" for ch in str(p)) for p in parts)


def _diagnosis(group: list[dict]) -> dict | None:
    """The per-layer SQNR of the case's diagnosis as bars (red: the worst layers, where the error enters)."""
    from qrobust.gate.diagnosis import describe_fix

    d = next((c["diagnosis"] for c in group if c.get("diagnosis")), None)
    if not d:
        return None
    layers = d["layers"]
    worst = {w.split(" (")[0] for w in d["line"].removeprefix("worst layers: ").split("), ")}
    top = max([r["sqnr_db"] for r in layers if isinstance(r["sqnr_db"], (int, float))] + [1.0])
    bars = []
    for i, r in enumerate(layers):
        value = r["sqnr_db"] if isinstance(r["sqnr_db"], (int, float)) else top
        w = max(1.0, 360 * max(0.0, value) / top)
        bars.append(f'<rect class="{"m-fail" if r["layer"] in worst else "bar"}" x="170" y="{i * 12}" width="{w:.0f}" '
                    f'height="10"/><text x="165" y="{i * 12 + 9}" class="yt">{_escape(r["layer"])}</text>'
                    f'<text x="{174 + w:.0f}" y="{i * 12 + 9}" class="lg">{value:.1f} dB</text>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="590" height="{len(layers) * 12 + 4}" role="img" '
           f'aria-label="per-layer SQNR">{"".join(bars)}</svg>')
    return {"line": d["line"], "samples": len(d["samples"]), "svg": Markup(svg),
            "fix": describe_fix(d["fix"]) if d.get("fix") else None}


def _escape(text: str) -> str:
    return str(Markup.escape(text))


def _flipped(group: list[dict], per_case: int = 5) -> list[dict]:
    """A few samples whose top-1 changed, with both models' top-3 (from the case's details)."""
    flipped: list[dict] = next((c["details"]["flipped"] for c in group if (c.get("details") or {}).get("flipped")), [])
    return [{"sample": f.get("sample", f["id"]), "label": f["label"],
             **{m: ", ".join(f"{cls} ({p:.2f})" for cls, p in f[m]) for m in ("fp32", "quantized")}}
            for f in flipped[:per_case]]


def _overlays_by_case(overlays: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for o in sorted(overlays, key=lambda o: -o["rmse"]):
        out[_okey(o)].append(o)
    return out


def _spotlight(overlays: list[dict], unique: list[dict], per_pair: int = 2) -> list[dict]:
    """Overlays of cases that do not fail (seed 001's Figure 2: where the maps differ most), a couple per
    pair, expected failures first; failing cases carry theirs in their card."""
    failing = {_key(c) for c in unique if c["verdict"] in BAD}
    caught = {_key(c) for c in unique if c["verdict"] == "xfail"}
    out = []
    for pair in sorted({o["pair"] for o in overlays}):
        own = [o for o in overlays if o["pair"] == pair and _okey(o) not in failing]
        own.sort(key=lambda o: (_okey(o) not in caught, -o["rmse"]))
        out += [{**o, "caught": _okey(o) in caught} for o in own[:per_pair]]
    return out


def _okey(o: dict) -> tuple:
    """An overlay's case key, level 0 folded into ``clean`` like the cases'."""
    return o["pair"], "clean" if o["level"] == 0 else o["perturbation"], o["level"]


def _int8_units(features: dict | None) -> str:
    """The CPU units that switch int8 kernels, as the report's CPU line names them."""
    if not features:
        return ""
    return ", " + ", ".join(("" if features.get(k) else "no ") + label
                            for k, label in (("avx512_vnni", "AVX512-VNNI"), ("amx_int8", "AMX")))


def provenance(report: dict) -> dict:
    env = report["environment"]
    run = {"date": report.get("timestamp"), "duration": _duration(report.get("duration_s")),
           "qrobust": report.get("qrobust_version"), "git commit": report.get("git_commit") or "not a repository",
           "command": " ".join(map(str, report.get("command") or [])), "thresholds": report.get("thresholds_path"),
           "thresholds sha256": env.get("thresholds_sha256"), "decision": env.get("decision"), "seed": env.get("seed"),
           "torch": env.get("torch"), "torchvision": env.get("torchvision"), "python": env.get("python"),
           "CPU": f"{env.get('machine')} ({env.get('cpu_capability')}{_int8_units(env.get('cpu_features'))}, "
                  f"{env.get('threads')} threads)"}
    pairs = []
    for name, p in (env.get("pairs") or {}).items():
        cam = p.get("cam") or {}
        engine = p.get("engine") or (p.get("runtimes") or {}).get("quantized")
        kernels = "; ".join(f"{kind}s on {', '.join(f'{lib} ({n})' for lib, n in libs.items())}"
                            for kind, libs in (p.get("kernels") or {}).items())
        pairs.append({"pair": name, "recipe": p.get("recipe") or p.get("kind"),
                      "engine": f"{engine}: {kernels}" if kernels else engine,
                      "cam": f"{cam.get('method')}: {cam.get('fp32_layer')}"
                      + ("" if cam.get("quantized_layer") in (None, cam.get("fp32_layer")) else f" / {cam['quantized_layer']}"),
                      "data": f"{p.get('dataset')} ({p.get('samples')} samples)",
                      "weights": env.get("weights", {}).get(name, "")})
    return {"run": {k: v for k, v in run.items() if v is not None}, "pairs": pairs,
            "forward_passes": json.dumps(report.get("forward_passes", {}), indent=1)}


def _duration(seconds) -> str | None:
    if seconds is None:
        return None
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s} s" if minutes else f"{s} s"


# ---- CAM thumbnails -------------------------------------------------------------------------------
def _jet(m):
    import torch

    return torch.stack([(1.5 - (4 * m - c).abs()).clamp(0, 1) for c in (3, 2, 1)])


COLOUR_BAR = ('<svg xmlns="http://www.w3.org/2000/svg" class="cbar" width="200" height="30" role="img" '
              'aria-label="CAM colour scale"><defs><linearGradient id="jet">'
              + "".join(f'<stop offset="{x:g}" stop-color="{c}"/>' for x, c in
                        ((0, "#00007f"), (0.125, "#0000ff"), (0.375, "#00ffff"), (0.625, "#ffff00"),
                         (0.875, "#ff0000"), (1, "#7f0000")))
              + '</linearGradient></defs><rect x="20" y="2" width="160" height="12" fill="url(#jet)"/>'
              '<text x="20" y="27" class="xt">0</text><text x="180" y="27" class="xt">1</text>'
              '<text x="100" y="27" class="xt">CAM (normalized)</text></svg>')


def thumbnail(pixels, cam_map=None, size: int = 96) -> str:
    """A data URI of the image, with the CAM blended on top in the jet colour map when given: a PNG at the
    image's own resolution for small images (the page scales it up, pixelated), else a JPEG ``size`` px wide."""
    import torch
    from PIL import Image

    img = pixels.detach().float().cpu()
    img = img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]
    if cam_map is not None:
        img = 0.5 * img + 0.5 * _jet(cam_map.detach().float().cpu().clamp(0, 1))
    array = (img.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    picture, buffer = Image.fromarray(array), io.BytesIO()
    if max(picture.size) <= 64:
        picture.save(buffer, format="PNG", optimize=True)
        kind = "png"
    else:
        picture.thumbnail((size, size), Image.Resampling.BILINEAR)
        picture.save(buffer, format="JPEG", quality=80, optimize=True)
        kind = "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode()


def case_extras(case: dict, cases: list[dict], overlays: list[dict]) -> list[dict]:
    """pytest-html extras for one failing check: its chart over the levels recorded so far (HTML) and its
    CAM overlays (images), in pytest-html's extras format."""
    from pytest_html import extras

    chart = _metric_chart(_curves(cases), case["pair"], case["perturbation"], case["metric"])
    out = [extras.html(f"<div>{_escape(comparison(case))}</div>{chart}")] if chart else []
    for o in overlays[:1]:
        for model, top1 in (("fp32", o["top1_fp32"]), ("quantized", o["top1_quant"])):
            kind, data = o[model].removeprefix("data:image/").split(";base64,")
            out.append(extras.image(data, name=f"{model} CAM, sample {o['id']}, predicts {top1}",
                                    mime_type=f"image/{kind}", extension=kind))
    return out
