"""Whole models: DiT-XL/2 DDIM + CFG sampling (images/s) and training step vs its plain-PyTorch
twins and torch.compile, and the VQGAN / LlamaGen tokenizers (end to end, quantize stage).

Cases (inputs, FLOPs, skipped backends) come from ``vqkernels/bench/models.py``.
"""
OP = "models"


def test_models(bench_case, measure):
    case, backend = bench_case
    measure(case, backend)
