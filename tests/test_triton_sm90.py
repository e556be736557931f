"""Every Triton GPU kernel compiles for sm_90 (H100) with the installed Triton, no GPU needed.

The interpreter tests run the kernels' logic on a CPU but never lower them:
tl.dot on tensor cores, atomics, libdevice and shared-memory budgets are only
checked by compiling. A subprocess does it, since the interpreter is on here.
"""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

COMPILE_ALL = textwrap.dedent(r'''
    import itertools
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vqkernels.triton import (adaln, attention, ddim, ema, gelu, group_norm, residual,
                                  search, timestep)

    TARGET = GPUTarget("cuda", 90, 32)
    done = 0

    def build(fn, pointers, scalars, constants, num_warps=4, num_stages=3, aligned=False):
        """aligned: the pointers are 16-byte aligned, as the JIT specializes them at launch
        (vectorized loads and cp.async pipelining, hence the real shared-memory footprint)."""
        global done
        signature = {**pointers, **scalars, **{name: "constexpr" for name in constants}}
        attrs = ({(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in pointers}
                 if aligned else None)
        source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
        compiled = triton.compile(source, target=TARGET,
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
        done += 1
        return compiled

    # search: every autotuning config of every family (D = 256), with and without STATS.
    for family, precision, z in (("half", "bf16", "*bf16"), ("fp32", "tf32", "*fp32"),
                                 ("fp32", "bf16", "*fp32"), ("fp32_ieee", "ieee", "*fp32")):
        for config in search._CONFIGS[family]:
            for stats, d in ((True, 256), (False, 256), (True, 8)):
                if not stats and config is not search._CONFIGS[family][0] and d == 256:
                    continue  # without STATS the kernel is a subset: one config suffices
                blocks = config.kwargs
                compiled = build(search._nearest_code_kernel,
                                 dict(z_ptr=z, e_ptr=z, sqnorm_ptr="*fp32", idx_ptr="*i64",
                                      dist_ptr="*fp32", counts_ptr="*i32", sums_ptr="*fp32"),
                                 dict(N="i32", K="i32"),
                                 dict(D=d, PRECISION=precision, STATS=stats,
                                      BLOCK_D=search._block_d(d, blocks["BLOCK_D_MAX"]),
                                      **blocks),
                                 config.num_warps, config.num_stages, aligned=True)
                assert compiled.metadata.shared <= 227 * 1024, (family, config, d, stats)

    # residual search: every config at D = 128 in bf16 with and without STATS, the first at
    # the other dots and widths.
    for z, precision, dims, configs in (("*bf16", "bf16", (128,), residual._CONFIGS),
                                        ("*bf16", "bf16", (8, 256), residual._CONFIGS[:1]),
                                        ("*fp32", "tf32", (128,), residual._CONFIGS[:1]),
                                        ("*fp32", "ieee", (128,), residual._CONFIGS[:1])):
        for config, d, stats in itertools.product(configs, dims, (False, True)):
            compiled = build(residual._residual_search_kernel,
                             dict(z_ptr=z, books_ptr=z, sqnorms_ptr="*fp32", starts_ptr="*i64",
                                  idx_ptr="*i64", out_ptr=z, counts_ptr="*i32",
                                  sums_ptr="*fp32"), dict(N="i32", Q="i32"),
                             dict(D=d, PRECISION=precision, STATS=stats, BLOCK_D=max(16, d),
                                  **config.kwargs),
                             config.num_warps, config.num_stages, aligned=True)
            assert compiled.metadata.shared <= 227 * 1024, (config, d, precision, stats)

    blocks = ema._blocks(256)
    for z in ("*fp32", "*bf16"):
        build(ema._code_stats_kernel, dict(z_ptr=z, idx_ptr="*i64", counts_ptr="*i32",
                                           sums_ptr="*fp32"), dict(N="i32", K="i32", D="i32"),
              dict(BLOCK_N=blocks["BLOCK_N"], BLOCK_D=blocks["BLOCK_D"]))
        build(ema._segment_sums_kernel, dict(z_ptr=z, order_ptr="*i64", offsets_ptr="*i64",
                                             sums_ptr="*fp32"), dict(D="i32"),
              dict(BLOCK_J=blocks["BLOCK_J"], BLOCK_D=blocks["BLOCK_D"]))
        build(ema._ema_codebook_kernel,
              dict(embed_ptr="*fp32", sums_ptr="*fp32", cluster_ptr="*fp32", codebook_ptr=z,
                   total_ptr="*fp32"),
              dict(K="i32", D="i32", decay="fp32", keep="fp32", debias="fp32", eps="fp32",
                   k_eps="fp32"),
              dict(BLOCK_K=blocks["BLOCK_N"], BLOCK_D=blocks["BLOCK_D"]))
    for counts in ("*i32", "*fp32"):
        build(ema._ema_cluster_kernel, dict(cluster_ptr="*fp32", counts_ptr=counts,
                                            total_ptr="*fp32"),
              dict(K="i32", decay="fp32", keep="fp32", debias="fp32"),
              dict(BLOCK_K=blocks["BLOCK_K"]))

    build(timestep._timestep_embedding_kernel, dict(t_ptr="*fp32", out_ptr="*bf16"),
          dict(n="i32", dim="i32", half="i32", neg_log_max_period="fp32",
               freq_denominator="fp32", scale="fp32"),
          dict(FLIP_SIN_TO_COS=True, BLOCK_N=32, BLOCK_F=128))

    # DDIM step: every prediction type and noise mode, bf16 and fp32, full and x0-only passes.
    # The clamps must keep NaN (min.NaN / max.NaN): plain min.f32 / max.f32 return the other operand.
    for dtype in ("*fp32", "*bf16"):
        for prediction in (0, 1, 2):
            for noise, threshold, guided in ((0, False, False), (1, True, True), (2, False, True)):
                compiled = build(
                    ddim._ddim_step_kernel,
                    dict(x_ptr=dtype, cond_ptr=dtype, uncond_ptr=dtype, t_ptr="*i64",
                         table_ptr="*fp32", noise_ptr=dtype, seed_ptr="*i64",
                         threshold_ptr="*fp32", prev_ptr=dtype, x0_ptr=dtype),
                    dict(cond_stride="i32", uncond_stride="i32", t_stride="i32",
                         num_train="i32", step_ratio="i32", final_alpha="fp32", eta="fp32",
                         clip_range="fp32", guidance_scale="fp32", guided_elems="i32", m="i32",
                         blocks_per_row="i32"),
                    dict(PREDICTION=prediction, GUIDED=guided, CLIP=True, THRESHOLD=threshold,
                         USE_CLIPPED=prediction == 1, NOISE=noise, WRITE_PREV=True,
                         WRITE_X0=noise != 2, BLOCK=ddim._BLOCK))
                ptx = compiled.asm["ptx"]
                assert "min.NaN.f32" in ptx and "max.NaN.f32" in ptx, "DDIM clamp drops NaN"
                assert not re.search(r"\b(min|max)\.f32\b", ptx), "a DDIM min/max drops NaN"
    # Attention: forward, delta, dK/dV and dQ with the launcher's configs, bf16 and fp32, head
    # dims 64, 72 (a 128-column tile) and 128; every one must fit the H100's 227 KiB of shared
    # memory.
    for dtype, ptr in ((attention.torch.bfloat16, "*bf16"), (attention.torch.float32, "*fp32")):
        for d in (64, 72, 128):
            configs = attention._configs(dtype, d)
            align = 8 if ptr == "*bf16" else 4
            heads = dict(HEAD_DIM=d, BLOCK_D=attention._block_d(d), ALIGN=align)
            strides = {f"s{t}_{a}": "i32" for t in ("q", "k", "v", "do") for a in "bhs"}
            backward = dict(strides, H="i32", Sq="i32", Sk="i32", scale="fp32", qk_scale="fp32")
            kernels = (
                ("forward", attention._attention_forward_kernel,
                 dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, out_ptr=ptr, lse_ptr="*fp32"),
                 {k: v for k, v in backward.items() if not k.startswith("sdo") and k != "scale"},
                 heads),
                ("delta", attention._attention_delta_kernel,
                 dict(out_ptr=ptr, do_ptr=ptr, delta_ptr="*fp32"),
                 dict({f"s{t}_{a}": "i32" for t in ("o", "do") for a in "bhs"}, H="i32", Sq="i32"),
                 heads),
                ("dkdv", attention._attention_dkdv_kernel,
                 dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, do_ptr=ptr, lse_ptr="*fp32",
                      delta_ptr="*fp32", dk_ptr=ptr, dv_ptr=ptr), backward, heads),
                ("dq", attention._attention_dq_kernel,
                 dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, do_ptr=ptr, lse_ptr="*fp32",
                      delta_ptr="*fp32", dq_ptr=ptr), backward, heads),
            )
            for name, fn, pointers, scalars, constants in kernels:
                config = dict(configs[name])
                num_warps, num_stages = config.pop("num_warps"), config.pop("num_stages")
                compiled = build(fn, pointers, scalars, {**constants, **config}, num_warps,
                                 num_stages, aligned=True)
                shared = compiled.metadata.shared
                print(f"attention {name} {ptr[1:]} d={d}: {shared} bytes of shared memory")
                assert shared <= 227 * 1024, (name, ptr, d, shared)
    # adaLN: each kernel in bf16 and fp32, a register-resident DiT row and the looped one.
    for ptr in ("*bf16", "*fp32"):
        strides = lambda *names: {f"{n}_s{a}": "i32" for n in names for a in "bt"}
        for block, one_tile in ((2048, True), (adaln.MAX_TILE, False)):
            warps = adaln._warps(block)
            for residual in (False, True):
                build(adaln._adaln_forward_kernel,
                      dict(x_ptr=ptr, y_ptr=ptr, gate_ptr=ptr, shift_ptr=ptr, scale_ptr=ptr,
                           h_ptr=ptr, x_new_ptr=ptr, mean_ptr="*fp32", rstd_ptr="*fp32"),
                      dict(strides("x", "y", "gate", "shift", "scale"), T="i32", D="i32",
                           eps="fp32"),
                      dict(HAS_RESIDUAL=residual, BLOCK_D=block, ONE_TILE=one_tile), warps)
                build(adaln._adaln_backward_kernel,
                      dict(grad_h_ptr=ptr, grad_x_new_ptr=ptr, x_ptr=ptr, scale_ptr=ptr,
                           mean_ptr="*fp32", rstd_ptr="*fp32", grad_x_ptr=ptr,
                           shift_partial_ptr="*fp32", scale_partial_ptr="*fp32"),
                      dict(strides("gh", "gxn", "x", "scale"), T="i32", D="i32", chunks="i32"),
                      dict(ROWS=64 if one_tile else 1, HAS_GRAD_X_NEW=residual, BLOCK_D=block,
                           ONE_TILE=one_tile), warps)
        build(adaln._gated_residual_kernel, dict(x_ptr=ptr, gate_ptr=ptr, y_ptr=ptr, out_ptr=ptr),
              dict(strides("x", "gate", "y"), T="i32", D="i32"), dict(BLOCK_D=1024))
        build(adaln._gated_residual_backward_kernel,
              dict(grad_ptr=ptr, gate_ptr=ptr, y_ptr=ptr, grad_y_ptr=ptr, gate_partial_ptr="*fp32"),
              dict(strides("grad", "gate", "y"), T="i32", D="i32", chunks="i32"),
              dict(ROWS=64, BLOCK_D=1024))
        # GELU: the forward (in place or not) and the backward.
        build(gelu._gelu_forward_kernel, dict(x_ptr=ptr, y_ptr=ptr), dict(n="i64"),
              dict(BLOCK=gelu.BLOCK), aligned=True)
        build(gelu._gelu_backward_kernel, dict(dy_ptr=ptr, x_ptr=ptr, dx_ptr=ptr), dict(n="i64"),
              dict(BLOCK=gelu.BLOCK), aligned=True)
    # GroupNorm: both layouts, the stats and the apply kernel (with SiLU), a VQGAN's C = 128.
    for ptr in ("*bf16", "*fp32"):
        for channels_last in (False, True):
            block_p, block_c = group_norm._tiles(channels_last, 128)
            build(group_norm._group_stats_kernel,
                  dict(x_ptr=ptr, mean_ptr="*fp32", rstd_ptr="*fp32"),
                  dict(C="i32", HW="i32", CG="i32", G="i32", eps="fp32"),
                  dict(CHANNELS_LAST=channels_last, BLOCK_P=1024, BLOCK_C=4), aligned=True)
            build(group_norm._group_norm_apply_kernel,
                  dict(x_ptr=ptr, y_ptr=ptr, w_ptr=ptr, b_ptr=ptr, mean_ptr="*fp32",
                       rstd_ptr="*fp32"),
                  dict(C="i32", HW="i32", CG="i32", G="i32"),
                  dict(CHANNELS_LAST=channels_last, SILU=True, BLOCK_P=block_p,
                       BLOCK_C=block_c), aligned=True)
    print(f"compiled {done} kernels")
''')


@pytest.mark.slow
def test_every_triton_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_ALL], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-6000:]}"
    assert "compiled" in result.stdout, result.stdout
