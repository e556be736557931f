"""Timestep embedding: each usable backend vs the reference, N in {256, 4096, 65536} x dim 256.

Cases (inputs, bytes floor) come from ``vqkernels/bench/timestep.py``.
"""
OP = "timestep"


def test_timestep(bench_case, measure):
    case, backend = bench_case
    measure(case, backend)
