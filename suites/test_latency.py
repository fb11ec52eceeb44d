"""Latency: the quantized twin's speedup over FP32, measured interleaved; pytest-benchmark times the twin.

Gated only where the thresholds file sets ``latency.speedup`` / ``cam_speedup`` (a speedup belongs to
the machine it is measured on); otherwise measured and reported.
"""


def test_speedup(qrobust_latency_pair, qrobust_check, benchmark):
    qrobust_check.speedup(qrobust_latency_pair, benchmark)
