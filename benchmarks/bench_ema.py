"""EMA codebook update: each usable backend vs the torch bincount + index_add_ + update baseline.

Cases (shapes, baselines, bytes floor) come from ``vqkernels/bench/ema.py``.
"""
OP = "ema"


def test_ema(bench_case, measure):
    case, backend = bench_case
    measure(case, backend)
