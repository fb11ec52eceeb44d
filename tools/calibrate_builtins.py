"""Write the shipped calibration of every built-in pair (qrobust/models/calibration/<pair>.json).

    python tools/calibrate_builtins.py [PAIR ...]

Calibrates each built-in twin on this CPU, exactly as the pair builds it, and writes its activation
scales and zero points (qrobust.quant.calibration). Rerun when a built-in's weights, recipe or
calibration data change: building a pair refuses a stale file with one line.
"""
from __future__ import annotations

import argparse
import sys

from qrobust.models import pair_names
from qrobust.models.zoo import CALIBRATION, calibrated_here
from qrobust.quant.calibration import calibration_document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="*", help="built-in pairs (default: all)")
    args = parser.parse_args(argv)
    names = args.pairs or pair_names("builtin")
    CALIBRATION.mkdir(parents=True, exist_ok=True)
    for name in names:
        twin, source = calibrated_here(name)
        path = CALIBRATION / f"{name}.json"
        path.write_text(calibration_document(twin, source), encoding="utf-8")
        print(f"{path}: {source['recipe']['name']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
