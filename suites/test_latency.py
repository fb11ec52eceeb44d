"""Latency gate: the int8 twin's speedup over FP32, measured interleaved; pytest-benchmark times the twin."""
import torch


def test_speedup(qrobust_latency_pair, qrobust, benchmark, request):
    pair = qrobust.pair(qrobust_latency_pair)
    x = qrobust.latency_input(pair)
    with torch.inference_mode():
        benchmark.pedantic(pair.quantized, args=(x,), rounds=qrobust.latency_rounds, iterations=1, warmup_rounds=2)
    qrobust.check_speedup(pair, x, request.node)
