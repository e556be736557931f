"""adaLN: layer_norm_modulate, gated_residual and the fused step, forward and forward +
backward, vs the eager PyTorch of a DiT block and torch.compile of it, at DiT-XL/2 shapes.

Cases (inputs, bytes floor, skipped backends) come from ``vqkernels/bench/adaln.py``.
"""
OP = "adaln"


def test_adaln(bench_case, measure):
    case, backend = bench_case
    measure(case, backend)
