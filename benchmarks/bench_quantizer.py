"""Quantizer modules' training step: VectorQuantizer vs taming's VectorQuantizer2 and
VectorQuantize vs vector-quantize-pytorch, forward + backward on the same batch.

Cases (modules, shapes, floors) come from ``vqkernels/bench/quantizer.py``.
"""
OP = "quantizer"


def test_quantizer(bench_case, measure):
    case, backend = bench_case
    measure(case, backend)
