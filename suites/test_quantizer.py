"""Quantizer properties of every gated pair's twin: the scales, zero points and grids its layers use, and
for real int8 layers PyTorch's own quantize op against the reference math (Hypothesis, derandomized)."""


def test_quantizer_properties(qrobust_quantizer_pair, qrobust_check):
    qrobust_check.quantizer(qrobust_quantizer_pair)
