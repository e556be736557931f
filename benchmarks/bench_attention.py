"""Attention: the fused kernels vs every torch SDPA backend and the explicit-softmax
reference, forward and forward + backward, at DiT shapes (head_dim 72 and 64, 128).

Cases (inputs, FLOPs counted on the useful head dim) come from ``vqkernels/bench/attention.py``.
"""
OP = "attention"


def test_attention(bench_case, measure):
    case, backend = bench_case
    measure(case, backend)
