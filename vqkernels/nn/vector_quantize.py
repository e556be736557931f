"""vector-quantize-pytorch's ``VectorQuantize`` (EMA codebook) on vqkernels.ops, and its twin.

``VectorQuantize`` follows vector-quantize-pytorch 1.32 (its ``Codebook``):
buffers, init, the order of a training step (quantize with the codebook as it
is, then the EMA update, then dead-code restarts), the k-means init on the
first batch; so existing training code and checkpoints carry over, while each
step runs on the fused ops. ``ReferenceVectorQuantize`` is the same module on
the pure-PyTorch reference ops, for parity tests. Under ``torch.distributed``
every rank holds the same codebook, the one a single process would train on
the concatenated batch (``VectorQuantize`` says how).
"""
from __future__ import annotations

from collections import namedtuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vqkernels import ops
from vqkernels.nn._options import split_default_only
from vqkernels.ops.codebook_init import in_multi_rank_group
from vqkernels.reference import ema as reference_ema
from vqkernels.reference import search as reference_search

LossBreakdown = namedtuple(
    "LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"])

# vector-quantize-pytorch options implemented only at their default (None: off, as False).
_DEFAULT_ONLY = {
    "heads": 1, "separate_codebook_per_head": False, "layernorm_after_project_in": False,
    "commitment_use_cross_entropy_loss": False, "orthogonal_reg_weight": 0.0,
    "orthogonal_reg_active_codes_only": False, "orthogonal_reg_max_codes": None,
    "codebook_diversity_loss_weight": 0.0, "stochastic_sample_codes": False,
    "straight_through": False, "rotation_trick": None, "directional_reparam": False,
    "sync_affine_param": False, "vq_bridge": None, "manual_ema_update": False,
    "learnable_codebook": None, "in_place_codebook_optimizer": None, "affine_param": False,
    "sync_update_v": 0.0, "reinmax": False, "distributed_replace_codes": True,
}
# Accepted with any value: they only act together with an option above.
_IGNORED = ("codebook_diversity_temperature", "sample_codebook_temp",
            "directional_reparam_variance", "manual_in_place_optimizer_update",
            "affine_param_batch_decay", "affine_param_codebook_decay",
            "return_zeros_for_masked_padding")


def _l2norm(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, dim=-1, eps=1e-6)  # vector-quantize-pytorch's eps


def _forget_initted(module, incompatible_keys):
    module._initted = None  # a loaded checkpoint may carry another initted


class _Codebook(nn.Module):
    """The buffers of vector-quantize-pytorch's ``Codebook`` (one codebook, no affine)."""

    def __init__(self, dim: int, codebook_size: int, kmeans_init: bool, use_cosine_sim: bool):
        super().__init__()
        if kmeans_init:
            embed = torch.zeros(1, codebook_size, dim)
        else:
            embed = nn.init.kaiming_uniform_(torch.empty(1, codebook_size, dim))
            embed = _l2norm(embed) if use_cosine_sim else embed
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.ones(1, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("embed", embed)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        initted = state_dict.get(prefix + "initted")
        if initted is not None and initted.shape == (1,):  # releases before 1.20: float (1,)
            state_dict[prefix + "initted"] = initted.reshape(()).bool()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _VectorQuantizeBase(nn.Module):
    """Constructor, layouts, losses and the training step. Subclasses supply the math on the
    flat (N, D) float32 batch: ``_search`` (indices, and the batch statistics or None),
    ``_kmeans``, ``_stats``, ``_ema``, ``_expire``."""

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int | None = None, *,
                 decay: float = 0.8, eps: float = 1e-5, freeze_codebook: bool = False,
                 kmeans_init: bool = False, kmeans_iters: int = 10, sync_kmeans: bool = True,
                 use_cosine_sim: bool = False, threshold_ema_dead_code: float = 0,
                 channel_last: bool = True, accept_image_fmap: bool = False,
                 accept_3d_fmap: bool = False, commitment_weight: float = 1.0,
                 sync_codebook: bool | None = None, ema_update: bool | None = None,
                 route_gradients_to_input: bool = True, **options):
        super().__init__()
        for name in split_default_only("VectorQuantize", options, _DEFAULT_ONLY, _IGNORED):
            raise TypeError(f"VectorQuantize got an unexpected keyword argument {name!r}")
        if codebook_dim is not None and codebook_dim != dim:
            raise ValueError(f"codebook_dim={codebook_dim} != dim={dim} (projections) is not "
                             "supported by vqkernels.VectorQuantize")
        for name, value in (("dim", dim), ("codebook_size", codebook_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay!r}")
        if not isinstance(kmeans_iters, int) or kmeans_iters < 0:
            raise ValueError(f"kmeans_iters must be an int >= 0, got {kmeans_iters!r}")
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("accept_image_fmap and accept_3d_fmap are exclusive")
        self.dim, self.codebook_size, self.heads = dim, codebook_size, 1
        self.separate_codebook_per_head, self.has_projections = False, False
        self.decay, self.eps, self.kmeans_iters = decay, eps, kmeans_iters
        self.use_cosine_sim, self.threshold_ema_dead_code = use_cosine_sim, threshold_ema_dead_code
        self.channel_last, self.accept_image_fmap = channel_last, accept_image_fmap
        self.accept_3d_fmap, self.commitment_weight = accept_3d_fmap, commitment_weight
        self.ema_update = True if ema_update is None else ema_update
        self.freeze_codebook = freeze_codebook
        self.route_gradients_to_input = route_gradients_to_input
        self.sync_codebook = in_multi_rank_group() if sync_codebook is None else bool(sync_codebook)
        self.sync_kmeans = self.sync_codebook and sync_kmeans
        self._codebook = _Codebook(dim, codebook_size, kmeans_init, use_cosine_sim)
        self._initted = None  # host copy of _codebook.initted once True: no sync per step
        self.register_load_state_dict_post_hook(_forget_initted)

    @property
    def codebook(self) -> torch.Tensor:
        return self._codebook.embed[0]

    @codebook.setter
    def codebook(self, codes: torch.Tensor) -> None:
        self._codebook.embed.copy_(codes.reshape(self._codebook.embed.shape))

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        codes = self.codebook[indices]
        channel_first = not self.channel_last or self.accept_image_fmap or self.accept_3d_fmap
        return codes.movedim(-1, 1) if channel_first else codes

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.get_codes_from_indices(indices)  # no projections

    def forward(self, x: torch.Tensor, indices=None, mask=None, lens=None, topk=None,
                sample_codebook_temp=None, freeze_codebook: bool | None = None,
                return_loss_breakdown: bool = False, codebook_transform_fn=None,
                ema_update_weight=None, accum_ema_update: bool = False,
                ema_update: bool | None = None):
        """x (B, N, D) (``channel_last=False``: (B, D, N); ``accept_image_fmap``: (B, D, H, W);
        ``accept_3d_fmap``: (B, D, T, H, W); or one token (B, D)) -> ``(quantize, indices,
        loss)`` as vector-quantize-pytorch.

        The codes come from the codebook before this step's update; in training
        quantize is straight-through (x + sg(q - x)) when x requires grad, loss =
        commitment_weight * mse(sg(q), x) (a 0-dim tensor, zero in eval), and the
        EMA update and the dead-code restarts follow.
        """
        for name, value in (("indices", indices), ("mask", mask), ("lens", lens), ("topk", topk),
                            ("codebook_transform_fn", codebook_transform_fn),
                            ("ema_update_weight", ema_update_weight)):
            if value is not None:
                raise ValueError(f"{name} is not supported by vqkernels.VectorQuantize")
        if accum_ema_update:
            raise ValueError("accum_ema_update is not supported by vqkernels.VectorQuantize")
        freeze = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        ema_update = self.ema_update if ema_update is None else ema_update
        tokens, restore = self._to_tokens(x)
        if self.use_cosine_sim:
            tokens = _l2norm(tokens)
        flat = tokens.detach().reshape(-1, self.dim).float()
        learn = self.training and not freeze and (ema_update or self.threshold_ema_dead_code > 0)
        with torch.no_grad():
            self._init_embed(flat)
            embed = self._codebook.embed[0]
            ind, stats = self._search(flat, embed, with_stats=learn)
            quantize = embed.index_select(0, ind).view(tokens.shape).to(x.dtype)
            if learn:
                self._learn(flat, ind, ema_update, stats)
        loss, commit = torch.zeros((), device=x.device), torch.zeros((), device=x.device)
        if self.training:
            loss.requires_grad_()
            if self.commitment_weight > 0:
                commit = F.mse_loss(quantize, tokens)
                loss = loss + commit * self.commitment_weight
            if tokens.requires_grad and self.route_gradients_to_input:
                quantize = tokens + (quantize - tokens).detach()
        out = restore(quantize, ind.view(tokens.shape[:-1])) + (loss,)
        if return_loss_breakdown:
            zero = torch.zeros((), device=x.device)
            return out + (LossBreakdown(commit, zero, zero, zero),)
        return out

    def _to_tokens(self, x):
        """x -> (B, N, D) and the function that puts (quantize, indices) back in x's layout."""
        fmap = 4 if self.accept_image_fmap else 5 if self.accept_3d_fmap else None
        if x.dim() not in ((fmap,) if fmap else (2, 3)):
            layout = {4: "(B, D, H, W)", 5: "(B, D, T, H, W)",
                      None: "(B, N, D) or (B, D)" if self.channel_last else "(B, D, N) or (B, D)"}
            raise ValueError(f"x must be {layout[fmap]}, got shape {tuple(x.shape)}")
        only_one, spatial = x.dim() == 2, x.shape[2:]
        if only_one:
            x = x[:, None, :]
        elif fmap or not self.channel_last:
            x = x.flatten(2).transpose(1, 2)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x has {x.shape[-1]} features, the codebook has dim={self.dim} "
                             f"(x read as (B, N, D): {tuple(x.shape)})")

        def restore(quantize, ind):
            if only_one:
                return quantize[:, 0], ind[:, 0]
            if fmap:
                b = quantize.shape[0]
                return (quantize.transpose(1, 2).reshape(b, self.dim, *spatial),
                        ind.reshape(b, *spatial))
            return (quantize if self.channel_last else quantize.transpose(1, 2)), ind
        return x, restore

    def _init_embed(self, flat):
        """k-means on the first batch when built with kmeans_init (in eval too, as theirs):
        cluster_size = counts, embed_avg = centers * counts, embed = the EMA codebook of those."""
        if self._initted is None:
            self._initted = bool(self._codebook.initted)  # host read until initted
        if self._initted:
            return
        centers, counts = self._kmeans(flat)
        book = self._codebook
        book.cluster_size.copy_(counts[None])
        book.embed_avg.copy_(centers[None] * counts[None, :, None])
        self._ema(flat[:0], flat.new_zeros(0, dtype=torch.int64), decay=1.0)  # only the divide
        if self.use_cosine_sim:
            book.embed.copy_(_l2norm(book.embed))
        book.initted.fill_(True)
        self._initted = True

    def _learn(self, flat, ind, ema_update, stats):
        self._update(flat, ind, ema_update, stats)

    def _update(self, flat, ind, ema_update, stats, ema_done=False):
        """The EMA step (from ``stats``, this batch's counts and sums, if the search made them;
        ``ema_done``: ResidualVQ already updated the codebook, with its other stages')."""
        book = self._codebook
        if ema_update:
            if not ema_done:
                self._ema(flat, ind, self.decay, stats)
            if self.use_cosine_sim:
                book.embed.copy_(_l2norm(book.embed))
        else:  # the statistics still move, for the dead-code restarts (as theirs)
            counts, sums = self._stats(flat, ind) if stats is None else stats
            book.cluster_size[0].lerp_(counts, 1.0 - self.decay)
            book.embed_avg[0].lerp_(sums, 1.0 - self.decay)
        if self.threshold_ema_dead_code > 0:
            self._expire(flat)

    def _metric(self):
        return "cosine" if self.use_cosine_sim else "l2"


class VectorQuantize(_VectorQuantizeBase):
    """Drop-in for vector-quantize-pytorch's ``VectorQuantize`` with its EMA codebook.

    Same constructor (options it does not implement raise ValueError unless
    left at their default: heads, separate_codebook_per_head, codebook_dim !=
    dim, orthogonal_reg_*, codebook_diversity_loss_weight,
    stochastic_sample_codes, straight_through, rotation_trick (None or False
    here: the straight-through estimator; 1.32 turns it on by default for dim
    > 1, which changes x's gradient, not the values), directional_reparam,
    learnable_codebook, in_place_codebook_optimizer, affine_param, vq_bridge,
    manual_ema_update, sync_update_v, commitment_use_cross_entropy_loss; forward's
    mask / lens / topk / indices), same forward contract and the same
    state_dict (``_codebook.initted`` bool, ``_codebook.cluster_size`` (1, K),
    ``_codebook.embed_avg`` and ``_codebook.embed`` (1, K, D)), so its
    checkpoints load (older ones with a float (1,) ``initted`` too).
    ``use_cosine_sim`` is supported. The search is ``ops.nearest_code`` (no N x
    K distance matrix), the update ``ops.ema_update_``, the init ``ops.kmeans``
    and the restarts ``ops.replace_dead_codes_``: no host sync in a training
    step (one, once, until the k-means init is done). Extras: ``precision`` and
    ``backend``, passed to the ops.

    Under ``torch.distributed`` (NCCL on GPUs, gloo on CPU: the same code path),
    with ``sync_codebook`` (default: when a multi-rank group is initialized),
    each training step all-reduces one flat (K, 1 + D) ``[counts | sums]``
    buffer and feeds it to ``ops.ema_update_(..., stats=...)``, so every rank
    holds the same codebook, equal to one process training on the concatenated
    batch. The k-means init (``sync_kmeans``) and the dead-code restarts draw
    their rows from the concatenated batch the same way on every rank
    (vqkernels/ops/codebook_init.py). Wrap the model in DDP as usual: the
    codebook is a buffer every rank already holds, so DDP's buffer broadcast
    (``broadcast_buffers=False`` skips it) changes nothing.
    """

    def __init__(self, dim, codebook_size, codebook_dim=None, *, precision: str | None = None,
                 backend: str | None = None, **kwargs):
        super().__init__(dim, codebook_size, codebook_dim, **kwargs)
        self.precision, self.backend = precision, backend
        # Set by ResidualVQ for one call. _deferred: the stage leaves its batch (and the
        # statistics its search made) there, and the stages' updates wait for one pass over
        # all of them (vqkernels.nn.residual_vq.update_deferred_stages). _given: this stage's
        # codes and their statistics (None unless training), from ResidualVQ's one search.
        self._deferred: list | None = None
        self._given: tuple[torch.Tensor, tuple | None] | None = None

    def _search(self, flat, embed, with_stats):
        """The l2 training step searches and gathers the EMA statistics in one op (one read
        of the batch where the backend fuses them, see ops.nearest_code_with_stats)."""
        if self._given is not None:
            return self._given
        if with_stats and not self.use_cosine_sim:
            ind, _, *stats = ops.nearest_code_with_stats(
                flat, embed, precision=self.precision, backend=self.backend,
                deterministic=torch.are_deterministic_algorithms_enabled())
            return ind, (tuple(stats) if self._deferred is not None else self._all_reduce(*stats))
        return ops.nearest_code(flat, embed, metric=self._metric(), precision=self.precision,
                                backend=self.backend)[0], None

    def _learn(self, flat, ind, ema_update, stats):
        if self._deferred is None:
            return self._update(flat, ind, ema_update, stats)
        self._deferred.append((self, flat, ind, ema_update, stats))

    def _kmeans(self, flat):
        return ops.kmeans(flat, self.codebook_size, self.kmeans_iters, metric=self._metric(),
                          backend=self.backend, distributed=self.sync_kmeans)

    def _local_stats(self, flat, ind):
        return ops.code_counts_and_sums(flat, ind, self.codebook_size, backend=self.backend,
                                        deterministic=torch.are_deterministic_algorithms_enabled())

    def _stats(self, flat, ind):
        return self._all_reduce(*self._local_stats(flat, ind))

    def _all_reduce(self, counts, sums):
        if not self.sync_codebook:
            return counts, sums
        stats = torch.cat([counts[:, None], sums], dim=1)  # one collective for both
        dist.all_reduce(stats)
        return stats[:, 0], stats[:, 1:]

    def _ema(self, flat, ind, decay, stats=None):
        book = self._codebook
        state = (book.cluster_size[0], book.embed_avg[0], book.embed[0])
        kwargs = dict(decay=decay, eps=self.eps, backend=self.backend,
                      deterministic=torch.are_deterministic_algorithms_enabled())
        if stats is None and self.sync_codebook:
            stats = self._stats(flat, ind)
        if stats is not None:
            ops.ema_update_(*state, stats=stats, **kwargs)
        else:  # statistics and update in one op
            ops.ema_update_(*state, flat, ind, **kwargs)

    def _expire(self, flat):
        book = self._codebook
        ops.replace_dead_codes_(book.embed[0], book.cluster_size[0], book.embed_avg[0], flat,
                                self.threshold_ema_dead_code, distributed=self.sync_codebook)


class ReferenceVectorQuantize(_VectorQuantizeBase):
    """The pure-PyTorch twin of ``VectorQuantize``, for parity tests: vqkernels.reference
    ops, k-means and restarts written the direct way (boolean indexing, host reads). Same
    random draws as ``VectorQuantize``. Single process only: never syncs across ranks."""

    def __init__(self, dim, codebook_size, codebook_dim=None, **kwargs):
        super().__init__(dim, codebook_size, codebook_dim, **kwargs)
        self.sync_codebook = self.sync_kmeans = False

    def _search(self, flat, embed, with_stats):
        return reference_search.nearest_code(flat, embed, self._metric())[0], None

    def _kmeans(self, flat):
        n, k, metric = flat.shape[0], self.codebook_size, self._metric()
        z = F.normalize(flat, dim=1) if self.use_cosine_sim else flat
        pick = torch.randperm(n, device=z.device)[:k] if n >= k else \
            torch.randint(0, n, (k,), device=z.device)
        means = z[pick]

        def assign(means):
            return self._stats(z, reference_search.nearest_code(z, means, metric)[0])

        counts = None
        for _ in range(self.kmeans_iters):
            counts, sums = assign(means)
            new = sums / counts.clamp_min(1)[:, None]
            new = F.normalize(new, dim=1) if self.use_cosine_sim else new
            means = torch.where((counts == 0)[:, None], means, new)
        if counts is None:
            counts, _ = assign(means)
        return means, counts

    def _stats(self, flat, ind):
        return reference_ema.code_counts_and_sums(flat, ind, self.codebook_size)

    def _ema(self, flat, ind, decay, stats=None):
        book = self._codebook
        reference_ema.ema_update_(book.cluster_size[0], book.embed_avg[0], book.embed[0], flat,
                                  ind, decay, self.eps)

    def _expire(self, flat):
        book = self._codebook
        n, k = flat.shape[0], self.codebook_size
        if n == 0:
            return
        perm = torch.randperm(n, device=flat.device)[:k]
        dead = torch.nonzero(book.cluster_size[0] < self.threshold_ema_dead_code)[:, 0]
        if n < k:  # a random subset of the dead codes, one distinct row each
            keys = torch.rand(k, device=flat.device)
            dead = dead[torch.argsort(keys[dead], stable=True)][:n]
        sampled = flat[perm[:len(dead)]]
        reset = self.threshold_ema_dead_code
        book.embed[0][dead] = sampled
        book.cluster_size[0][dead] = reset
        book.embed_avg[0][dead] = sampled * reset
