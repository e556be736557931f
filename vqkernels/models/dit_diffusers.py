"""Conversion between :class:`~vqkernels.models.DiT` and diffusers' ``DiTTransformer2DModel``.

diffusers holds DiT's tensors under other names: q, k and v as three Linears,
the timestep and label embedders repeated in every block (``norm1.emb``), the
head as ``proj_out_1`` / ``proj_out_2``; it recomputes the sin-cos table instead
of storing it. Its port embeds timesteps with ``downscale_freq_shift=1``
(frequencies ``10000**(-i / 127)`` where DiT has ``/ 128``) and gives each
block's second LayerNorm its ``norm_eps``: ``dit_from_diffusers`` sets DiT's
``timestep_freq_shift`` and ``mlp_norm_eps`` to match, so outputs agree.
diffusers is imported only when converting to it.
"""
from __future__ import annotations

import warnings

import torch

from vqkernels.models.dit import DiT, sincos_pos_embed_2d

# diffusers options that DiT's layout fixes.
_FIXED_CONFIG = {"activation_fn": "gelu-approximate", "attention_bias": True,
                 "norm_elementwise_affine": False, "norm_type": "ada_norm_zero"}


def dit_to_diffusers(model: DiT):
    """A ``DiTTransformer2DModel`` with ``model``'s weights, on its device and dtype.

    Warns when ``model.t_embedder.downscale_freq_shift`` is not diffusers' 1 (as
    for the released DiT): diffusers' outputs then differ slightly from DiT's.
    """
    from diffusers import DiTTransformer2DModel

    hidden, depth = model.pos_embed.shape[-1], len(model.blocks)
    if model.blocks[0].mlp.fc1.out_features != 4 * hidden:
        raise ValueError("diffusers' DiT has mlp_ratio 4, got "
                         f"{model.blocks[0].mlp.fc1.out_features / hidden}")
    if model.y_embedder.dropout_prob <= 0:
        raise ValueError("diffusers' label table has a null-class row: convert a DiT with "
                         "class_dropout_prob > 0")
    table = sincos_pos_embed_2d(hidden, model.grid_size)  # released rounded to float32 (or less)
    ulp = max(torch.finfo(model.pos_embed.dtype).eps, torch.finfo(torch.float32).eps)
    if not torch.allclose(model.pos_embed[0].cpu().double(), table, rtol=0, atol=2 * ulp):
        raise ValueError("pos_embed is not DiT's sin-cos table, which diffusers recomputes")
    if model.t_embedder.downscale_freq_shift != 1:
        warnings.warn("diffusers' DiT embeds timesteps with downscale_freq_shift=1, this model "
                      f"with {model.t_embedder.downscale_freq_shift}: their outputs differ "
                      "slightly (as for diffusers' port of the released DiT)", stacklevel=2)
    converted = DiTTransformer2DModel(
        num_attention_heads=model.num_heads, attention_head_dim=hidden // model.num_heads,
        in_channels=model.in_channels, out_channels=model.out_channels, num_layers=depth,
        sample_size=model.grid_size * model.patch_size, patch_size=model.patch_size,
        num_embeds_ada_norm=model.num_classes, norm_eps=model.blocks[0].norm2.eps,
        **_FIXED_CONFIG)
    ours, theirs = model.state_dict(), {}
    for name, names, stacked in _name_pairs(depth):
        parts = ours[name].chunk(len(names)) if stacked else [ours[name]] * len(names)
        theirs.update(zip(names, parts))
    converted.load_state_dict(theirs)
    for block in converted.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = model.y_embedder.dropout_prob
    if model.pos_embed.dtype != torch.float32:  # diffusers warns on any cast
        converted = converted.to(dtype=model.pos_embed.dtype)
    return converted.to(model.pos_embed.device)


def dit_from_diffusers(model, *, backend: str | None = None) -> DiT:
    """A :class:`DiT` with the weights of diffusers' ``model``, on its device and dtype.

    Every block of ``model`` must hold the same embedders (as converted DiTs do).
    """
    config = model.config
    unsupported = {k: config[k] for k, v in _FIXED_CONFIG.items() if config[k] != v}
    if unsupported:
        raise ValueError(f"DiT has no equivalent of diffusers' {unsupported}")
    if model.out_channels not in (config.in_channels, 2 * config.in_channels):
        raise ValueError(f"DiT predicts in_channels or twice as many, got out_channels="
                         f"{model.out_channels} for in_channels={config.in_channels}")
    embedders = model.transformer_blocks[0].norm1.emb
    dit = DiT(config.sample_size, config.patch_size, config.in_channels,
              config.num_attention_heads * config.attention_head_dim, config.num_layers,
              config.num_attention_heads, 4.0, embedders.class_embedder.dropout_prob,
              config.num_embeds_ada_norm, model.out_channels != config.in_channels,
              backend=backend, timestep_freq_shift=embedders.time_proj.downscale_freq_shift,
              mlp_norm_eps=config.norm_eps)
    theirs, ours = model.state_dict(), {"pos_embed": dit.pos_embed}
    for name, names, stacked in _name_pairs(config.num_layers):
        tensors = [theirs[n] for n in names]
        if not stacked and not all(torch.equal(tensors[0], t) for t in tensors[1:]):
            raise ValueError(f"{names[0]} differs between blocks; DiT has one {name}")
        ours[name] = torch.cat(tensors) if stacked else tensors[0]
    dit.load_state_dict(ours)
    return dit.to(next(model.parameters()).device, next(model.parameters()).dtype)


def _name_pairs(depth: int):
    """(DiT tensor name, its diffusers names, stacked): the DiT tensor is each of the
    diffusers tensors (copies), or with ``stacked`` their concatenation along dim 0."""
    blocks = [f"transformer_blocks.{i}." for i in range(depth)]
    linears = [
        ("x_embedder.proj", ["pos_embed.proj"]),
        ("t_embedder.mlp.0", [b + "norm1.emb.timestep_embedder.linear_1" for b in blocks]),
        ("t_embedder.mlp.2", [b + "norm1.emb.timestep_embedder.linear_2" for b in blocks]),
        ("final_layer.adaLN_modulation.1", ["proj_out_1"]),
        ("final_layer.linear", ["proj_out_2"]),
    ]
    for i, b in enumerate(blocks):
        linears += [(f"blocks.{i}.adaLN_modulation.1", [b + "norm1.linear"]),
                    (f"blocks.{i}.attn.qkv", [b + f"attn1.to_{n}" for n in "qkv"]),
                    (f"blocks.{i}.attn.proj", [b + "attn1.to_out.0"]),
                    (f"blocks.{i}.mlp.fc1", [b + "ff.net.0.proj"]),
                    (f"blocks.{i}.mlp.fc2", [b + "ff.net.2"])]
    table = ("y_embedder.embedding_table.weight",
             [b + "norm1.emb.class_embedder.embedding_table.weight" for b in blocks], False)
    return [(f"{ours}.{kind}", [f"{n}.{kind}" for n in theirs], ours.endswith("attn.qkv"))
            for ours, theirs in linears for kind in ("weight", "bias")] + [table]
