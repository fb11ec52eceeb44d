"""The ready-made gate: pytest suites parametrized from a thresholds file.

Run them with ``qrobust run [THRESHOLDS]`` or ``pytest --pyargs qrobust.suites --qrobust-thresholds PATH``.
"""
