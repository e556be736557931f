"""Which launch variant of the Triton attention kernels is correct on this GPU (one process each)."""
import argparse
import os
import sys

import torch
import triton

import vqkernels.triton.attention as ta

DEVICE = os.environ.get("PROBE_DEVICE", "cuda")
ORIG_CONFIGS = ta._configs
ORIG_SPLIT = ta._split_head_dim


def forward_override(**changes):
    def configs(dtype, d):
        cfgs = ORIG_CONFIGS(dtype, d)
        if dtype != torch.float32:
            cfgs["forward"] = {**cfgs["forward"], **changes}
        return cfgs
    return configs


def pad_split(d):
    return (max(16, triton.next_power_of_2(d)), 0)


VARIANTS = {
    "current": {},
    "stages2": {"configs": forward_override(num_stages=2)},
    "stages1": {"configs": forward_override(num_stages=1)},
    "m64w4": {"configs": forward_override(BLOCK_M=64, num_warps=4)},
    "m64w4s2": {"configs": forward_override(BLOCK_M=64, num_warps=4, num_stages=2)},
    "pad": {"split": pad_split},
    "pad_stages2": {"split": pad_split, "configs": forward_override(num_stages=2)},
}


def rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(shape, dtype, unaligned, gen):
    b, h, s, d = shape
    if unaligned:
        base = torch.randn(b, h, s, d + 1, generator=gen, device=DEVICE).to(dtype)
        return base[..., 1:]
    return torch.randn(b, h, s, d, generator=gen, device=DEVICE).to(dtype)


def check(dtype, d, s, unaligned, backward, gen):
    q, k, v = (make((2, 3, s, d), dtype, unaligned, gen) for _ in range(3))
    scale = d ** -0.5
    out, lse = ta.attention_forward(q, k, v, scale)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = torch.softmax(q64 @ k64.transpose(-1, -2) * scale, -1) @ v64
    errs = {"out": rel(out, ref.detach())}
    if backward:
        g = torch.randn(out.shape, generator=gen, device=DEVICE).to(dtype)
        gq, gk, gv = ta.attention_backward(g, q, k, v, out, lse, scale)
        rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), g.double())
        errs.update(dq=rel(gq, rq), dk=rel(gk, rk), dv=rel(gv, rv))
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return errs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="d=72 S=131 only (for memcheck)")
    parser.add_argument("--time", action="store_true")
    args = parser.parse_args()
    variant = VARIANTS[args.variant]
    ta._configs = variant.get("configs", ORIG_CONFIGS)
    ta._split_head_dim = variant.get("split", ORIG_SPLIT)
    gen = torch.Generator(DEVICE).manual_seed(0)
    cases = [(dt, 72, 131, ua, True) for dt in (torch.float16, torch.bfloat16)
             for ua in (False, True)]
    if not args.quick:
        cases += [(dt, d, s, False, False) for dt in (torch.float16, torch.bfloat16)
                  for d in (40, 48, 72, 80, 96, 128) for s in (17, 131)]
    worst = 0.0
    for dtype, d, s, unaligned, backward in cases:
        label = f"{args.variant} {str(dtype)[6:]} d={d} S={s}{' unaligned' if unaligned else ''}"
        try:
            errs = check(dtype, d, s, unaligned, backward, gen)
        except Exception as error:
            print(f"PROBE {label} ERROR {type(error).__name__}: {str(error)[:120]}", flush=True)
            sys.exit(3)
        bad = max(errs.values()) > 2e-2
        worst = max(worst, max(errs.values()))
        print(f"PROBE {label} {'FAIL' if bad else 'ok'} "
              + " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
    if args.time:
        from triton.testing import do_bench
        q, k, v = (torch.randn(64, 16, 256, 72, device=DEVICE, dtype=torch.bfloat16)
                   for _ in range(3))
        ms = do_bench(lambda: ta.attention_forward(q, k, v, 72 ** -0.5), warmup=25, rep=100)
        print(f"PROBE {args.variant} time fwd 64x16x256x72 bf16 {ms * 1e3:.1f} us", flush=True)
    print(f"PROBE {args.variant} worst {worst:.1e}", flush=True)


if __name__ == "__main__":
    main()
