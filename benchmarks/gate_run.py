"""One ``qrobust run`` from a benchmark, in a subprocess: its report.json, or one line saying why it wrote none
(a gate that fails still writes its report; a usage error or a crash does not)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def gate_report(args: list[str], cwd: str | Path, env: dict | None = None, report_dir: Path | None = None,
                label: str = "qrobust run", timeout: float | None = None) -> tuple[dict, subprocess.CompletedProcess]:
    """Run ``qrobust run ARGS -q -p no:randomly`` in ``cwd`` (a thresholds file, when given, must come first in
    ARGS); (its report, the finished process). The report is read from ``report_dir`` (default:
    ``cwd/qrobust-report``; pass ``--qrobust-report`` in ``args`` to move it)."""
    run = subprocess.run([sys.executable, "-m", "qrobust", "run", *args, "-q", "-p", "no:randomly"],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    path = (report_dir or Path(cwd) / "qrobust-report") / "report.json"
    if not path.exists():
        raise SystemExit(f"{label} wrote no report (exit {run.returncode}):\n{run.stdout[-3000:]}{run.stderr[-3000:]}")
    return json.loads(path.read_text()), run
