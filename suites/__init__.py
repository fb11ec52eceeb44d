"""The ready-made gate: pytest suites parametrized from a thresholds file, and the built-in gate's file.

Run them with ``qrobust run [THRESHOLDS]``, ``pytest --pyargs qrobust.suites --qrobust-thresholds PATH`` or,
in a clone of the repository, ``pytest suites`` (the thresholds.yaml at the rootdir). In the repository
this folder is ``suites/`` at the top level and ``BUILTIN_THRESHOLDS`` the top-level thresholds.yaml; the
wheel ships both as ``qrobust.suites``.
"""
from pathlib import Path

BUILTIN_THRESHOLDS = Path(__file__).parent / "thresholds.yaml"
