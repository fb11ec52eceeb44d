"""Bit-width gate (seed 003): every width from min_bits up meets all tolerances; lower widths must fail."""


def test_bitwidth(qrobust_bitwidth_case, qrobust_check):
    qrobust_check.metric(qrobust_bitwidth_case, *qrobust_bitwidth_case.tolerances)
