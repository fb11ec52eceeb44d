"""Hand-written SVG charts of a metric against the perturbation level: no JavaScript, no assets.

matplotlib would need ~10x the bytes per chart and a 0.5 s import; a report carries hundreds of these.
Styling lives in the page's CSS (classes ``tol``, ``band``, ``grid``, ``s0``/``s1``, ``m-fail`` ...), so
colour stays reserved for verdicts: series are neutral, failing points are red, inconclusive amber,
expected failures (caught) purple.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

MARKED = ("fail", "inconclusive", "xfail")  # verdicts a point is marked with
WIDTH, HEIGHT = 320, 200
LEFT, RIGHT, TOP, BOTTOM = 58, 12, 24, 44  # plot margins: y tick labels, title, x ticks and axis title


@dataclass
class Series:
    """One line: value per level; the first series of a chart is the metric, drawn solid."""
    name: str
    points: dict[float, float | None]
    band: dict[float, tuple[float, float]] = field(default_factory=dict)  # 95% interval per level
    marks: dict[float, str] = field(default_factory=dict)  # level -> verdict in MARKED


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """4 to 6 round ticks (steps of 1, 2, 2.5 or 5 x 10^k) covering [lo, hi]."""
    span = hi - lo
    best: list[float] = []
    for unit in (1, 2, 2.5, 5):
        for shift in (-1, 0, 1):
            step = unit * 10 ** (math.floor(math.log10(span / count)) + shift)
            first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
            ticks = [round(k * step, 12) for k in range(first, last + 1)]
            if 4 <= len(ticks) <= 6 and (not best or abs(len(ticks) - count) < abs(len(best) - count)
                                         or (len(ticks) == len(best) and ticks[-1] - ticks[0] < best[-1] - best[0])):
                best = ticks
    return best


def y_range(values: list[float], min_span: float) -> tuple[float, float]:
    """The data's range widened to at least ``min_span`` (about its middle): a change of one sample must
    not fill the chart's height. Callers pass the tolerances and interval ends among ``values``."""
    lo, hi = min(values), max(values)
    if hi - lo < min_span:
        middle = (lo + hi) / 2
        lo, hi = middle - min_span / 2, middle + min_span / 2
    return lo, hi


def min_span(values: list[float]) -> float:
    """The y-range floor: a tenth of the largest magnitude shown (0.1 for accuracies near 1), at least 1e-3."""
    return max(1e-3, 0.1 * max((abs(v) for v in values), default=0.0))


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def level_chart(title: str, x_title: str, y_title: str, series: list[Series],
                tolerance: dict[float, float | None] | None = None, direction: str = "") -> str:
    """A line chart against the level: per-level tolerance as a dashed step line, the first series' 95%
    interval as a band, marked points where a verdict is not a pass, titled axes, 4-6 round y ticks with
    gridlines. Levels are placed by value and labelled where they were evaluated."""
    steps = {x: t for x, t in (tolerance or {}).items() if t is not None}
    levels = sorted({x for s in series for x, y in s.points.items() if y is not None})
    if len(levels) < 2:
        return ""
    ys = [y for s in series for y in s.points.values() if y is not None and math.isfinite(y)]
    ys += list(steps.values()) + [v for s in series for band in s.band.values() for v in band if math.isfinite(v)]
    if not ys:
        return ""
    ticks = nice_ticks(*y_range(ys, min_span(ys)))
    y0, y1 = ticks[0], ticks[-1]
    x0, x1 = levels[0], levels[-1]
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return TOP + (y1 - min(max(y, y0), y1)) / (y1 - y0) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
           f'height="{HEIGHT}" role="img" aria-label="{html.escape(title)}">',
           f'<text class="ct" x="{WIDTH / 2:.0f}" y="14">{html.escape(title)}</text>',
           '<path class="grid" d="' + "".join(f"M{LEFT} {sy(t):.1f}H{WIDTH - RIGHT}" for t in ticks)
           + "".join(f"M{sx(x):.1f} {TOP}V{TOP + ph}" for x in levels) + '"/>',
           "".join(f'<text class="yt" x="{LEFT - 4}" y="{sy(t) + 3:.1f}">{t:g}</text>' for t in ticks),
           "".join(f'<text class="xt" x="{sx(x):.1f}" y="{TOP + ph + 12}">{x:g}</text>' for x in _spaced(levels, sx)),
           f'<text class="at" x="{LEFT + pw / 2:.0f}" y="{HEIGHT - 6}">{html.escape(x_title)}</text>',
           f'<text class="at" transform="rotate(-90)" x="{-(TOP + ph / 2):.0f}" y="12">{html.escape(y_title)}</text>']
    first = series[0]
    banded = sorted(x for x in first.band if x in first.points)
    if len(banded) >= 2:
        upper = " ".join(f"{sx(x):.1f},{sy(first.band[x][1]):.1f}" for x in banded)
        lower = " ".join(f"{sx(x):.1f},{sy(first.band[x][0]):.1f}" for x in reversed(banded))
        out.append(f'<polygon class="band" points="{upper} {lower}"><title>95% interval</title></polygon>')
    if steps:
        out.append(_tolerance_steps(steps, levels, sx, sy, direction))
    for i, s in enumerate(series):
        pts = sorted((x, y) for x, y in s.points.items() if y is not None)
        out.append(f'<polyline class="s{i}" points="{" ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)}"/>')
        out.extend(_point(s, x, y, sx(x), sy(y), i) for x, y in pts)
    if len(series) > 1:
        out.append("".join(f'<text class="lg s{i}t" x="{LEFT + 6 + 90 * i}" y="{TOP + 10}">{html.escape(s.name)}</text>'
                           for i, s in enumerate(series)))
    out.append("</svg>")
    return "".join(out)


def _spaced(levels: list[float], sx, gap: float = 18) -> list[float]:
    """The levels whose labels fit: each at least ``gap`` px after the last one shown, the last level always."""
    shown: list[float] = []
    for x in levels:
        if shown and sx(x) - sx(shown[-1]) < gap:
            if x != levels[-1]:
                continue
            shown.pop()
        shown.append(x)
    return shown


def _tolerance_steps(tolerance: dict[float, float], levels: list[float], sx, sy, direction: str) -> str:
    """One horizontal step per level (from midway to the previous level to midway to the next), joined by
    risers: a tolerance that changes with the level reads as a staircase, not as its last value."""
    known = [x for x in levels if x in tolerance]
    d = []
    for i, x in enumerate(known):
        left = sx(x) if i == 0 else (sx(known[i - 1]) + sx(x)) / 2
        right = sx(x) if i == len(known) - 1 else (sx(x) + sx(known[i + 1])) / 2
        d.append(f"{'M' if i == 0 else 'V'}{'' if i else f'{left:.1f} '}{sy(tolerance[x]):.1f}H{right:.1f}")
    label = "tolerance " + ", ".join(f"{tolerance[x]:g} at {x:g}" for x in known)
    return f'<path class="tol" data-steps="{len(known)}" d="{"".join(d)}"><title>{direction} {label}</title></path>'


def _point(s: Series, x: float, y: float, cx: float, cy: float, i: int) -> str:
    verdict = s.marks.get(x)
    if verdict in MARKED:
        band = s.band.get(x)
        interval = f" [{_fmt(band[0])}, {_fmt(band[1])}]" if band else ""
        return (f'<circle class="m-{verdict}" cx="{cx:.1f}" cy="{cy:.1f}" r="4.5"><title>{verdict}: {s.name} '
                f"{_fmt(y)}{interval} at {x:g}</title></circle>")
    return f'<circle class="p{i}" cx="{cx:.1f}" cy="{cy:.1f}" r="2"/>'
