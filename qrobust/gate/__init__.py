"""The gate: configuration, planning, evaluation, verdicts, baselines and reports (no pytest here)."""
