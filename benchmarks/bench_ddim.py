"""DDIM: the fused step vs the step as diffusers writes it, and the 50-step sampling loop
(eager, and replayed as one CUDA graph on a GPU).

Cases (inputs, bytes floor) come from ``vqkernels/bench/ddim.py``.
"""
OP = "ddim"


def test_ddim(bench_case, measure):
    case, backend = bench_case
    measure(case, backend)
