"""vector-quantize-pytorch's ``ResidualVQ`` and ``GroupedResidualVQ`` on vqkernels' VectorQuantize.

Residual quantization (SoundStream, EnCodec, RQ-VAE): stage q quantizes what
the stages before it left, ``r_0 = x``, ``r_{q+1} = r_q - sg(Q_q(r_q))``, and
the output is ``sum_q Q_q(r_q)``. Each stage is a ``VectorQuantize`` (fused
search + EMA statistics, no N x K buffer) with vector-quantize-pytorch 1.32's
constructor, forward contract, random draws and state dict
(``layers.{q}._codebook.*``, ``rvqs.{g}.layers.{q}._codebook.*``), so training
code and checkpoints carry over. Once the stages are initialized, one
``ops.residual_nearest_code`` searches all of them (fused: z read once), and
the stages take their codes from it; in training on Triton,
``ops.residual_nearest_code_with_stats`` also hands each stage the EMA
statistics of its residual from that same pass. Under ``torch.distributed``
the stages' EMA updates wait for the last stage (``update_deferred_stages``),
so that the statistics of all of them go in one all-reduce a step.
``ReferenceResidualVQ`` / ``ReferenceGroupedResidualVQ`` are the twins on the
pure-PyTorch ``ReferenceVectorQuantize``.
"""
from __future__ import annotations

import math
import random

import torch
import torch.distributed as dist
from torch import nn

from vqkernels import ops
from vqkernels.nn._options import split_default_only
from vqkernels.nn.vector_quantize import ReferenceVectorQuantize, VectorQuantize
from vqkernels.ops.codebook_init import in_multi_rank_group

# vector-quantize-pytorch ResidualVQ options implemented only at their default.
_DEFAULT_ONLY = {"heads": 1, "shared_codebook": False, "implicit_neural_codebook": False,
                 "beam_size": None, "eval_beam_size": None, "beam_score_quantizer_weights": None,
                 "quant_grad_frac": 0.0, "diveq": False}
_IGNORED = ("mlp_kwargs", "return_zeros_for_masked_padding")


def _sync_seed(device: torch.device) -> int:
    """vector-quantize-pytorch's dropout seed: one draw from torch's generator on ``device``,
    summed over ranks so that every rank drops the same stages."""
    seed = torch.randint(0, 10_000, (), device=device)
    if in_multi_rank_group():
        dist.all_reduce(seed)
    return int(seed.item())


class ResidualVQ(nn.Module):
    """Drop-in for vector-quantize-pytorch's ``ResidualVQ`` (EMA codebooks).

    ``codebook_size`` an int, or one per stage (then ``num_quantizers`` may be
    left out); ``codebook_dim`` != ``dim`` adds the ``project_in`` /
    ``project_out`` linear layers, as theirs. ``quantize_dropout`` (training
    only) keeps stages ``<= i`` for a random ``i >= quantize_dropout_cutoff_index``
    (rounded up to ``quantize_dropout_multiple_of``) and gives the dropped
    stages index -1 and loss 0. Every other keyword goes to each stage's
    ``VectorQuantize`` (``decay``, ``kmeans_init``, ``threshold_ema_dead_code``,
    ``use_cosine_sim``, ``backend``, ...). Not implemented (ValueError unless at
    the default): shared_codebook, implicit_neural_codebook, beam search,
    quant_grad_frac, diveq, heads; forward's mask and indices.
    """

    quantizer_class = VectorQuantize
    fuse_stages = True  # one ops.residual_nearest_code for every stage's search

    def __init__(self, *, dim: int, num_quantizers: int | None = None,
                 codebook_size: int | tuple[int, ...], codebook_dim: int | None = None,
                 quantize_dropout: bool = False, quantize_dropout_cutoff_index: int = 0,
                 quantize_dropout_multiple_of: int = 1, accept_image_fmap: bool = False,
                 **kwargs):
        super().__init__()
        stage_options = split_default_only("ResidualVQ", kwargs, _DEFAULT_ONLY, _IGNORED)
        sizes = (tuple(codebook_size) if isinstance(codebook_size, (tuple, list))
                 else (codebook_size,) * (num_quantizers or 0))
        if num_quantizers is None:
            num_quantizers = len(sizes)
        if not sizes or len(sizes) != num_quantizers:
            raise ValueError(f"num_quantizers={num_quantizers} and codebook_size={codebook_size!r}"
                             " must give one codebook size per stage (at least one)")
        if not 0 <= quantize_dropout_cutoff_index < max(num_quantizers, 1):
            raise ValueError("quantize_dropout_cutoff_index must be in [0, num_quantizers), got "
                             f"{quantize_dropout_cutoff_index}")
        if not isinstance(quantize_dropout_multiple_of, int) or quantize_dropout_multiple_of < 1:
            raise ValueError("quantize_dropout_multiple_of must be an int >= 1, got "
                             f"{quantize_dropout_multiple_of!r}")
        codebook_dim = dim if codebook_dim is None else codebook_dim
        projected = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if projected else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if projected else nn.Identity()
        self.has_projections, self.codebook_dim = projected, codebook_dim
        self.num_quantizers, self.codebook_sizes = num_quantizers, sizes
        self.uniform_codebook_size = len(set(sizes)) == 1
        self.quantize_dropout = quantize_dropout and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.accept_image_fmap = accept_image_fmap
        self.layers = nn.ModuleList(
            self.quantizer_class(codebook_dim, size, accept_image_fmap=accept_image_fmap,
                                 **stage_options) for size in sizes)

    @property
    def codebook_size(self) -> int:
        return self.layers[0].codebook_size

    @property
    def codebooks(self):
        """(Q, K, D) when every stage has K codes, else a tuple of the Q (K_q, D) codebooks."""
        books = tuple(layer.codebook for layer in self.layers)
        return torch.stack(books) if self.uniform_codebook_size else books

    def forward(self, x: torch.Tensor, mask=None, indices=None, return_all_codes: bool = False,
                sample_codebook_temp=None, freeze_codebook: bool = False, beam_size=None,
                rand_quantize_dropout_fixed_seed: int | None = None):
        """x (..., dim) (``accept_image_fmap``: (B, dim, H, W)) -> ``(quantized, indices (...,
        Q), commit_losses (Q,))``, plus all codes (Q, ..., codebook_dim) with
        ``return_all_codes``; as vector-quantize-pytorch's ResidualVQ."""
        for name, value in (("mask", mask), ("indices", indices), ("beam_size", beam_size)):
            if value is not None:
                raise ValueError(f"{name} is not supported by vqkernels.ResidualVQ")
        last = self._last_stage(x.device, rand_quantize_dropout_fixed_seed)
        x = self.project_in(x)
        quantized_out, residual = torch.zeros_like(x), x
        all_indices, losses = [], []
        given = self._search_all_stages(x, last, with_stats=self.training and not freeze_codebook)
        # The stages' EMA steps wait for the last stage: one update of every codebook (and
        # under torch.distributed one all-reduce of every stage's statistics) a step.
        syncs = self._syncs_statistics()
        deferred = [] if self.training and (given or syncs) else None
        try:
            for q, layer in enumerate(self.layers):
                if q > last:
                    all_indices.append(torch.full_like(all_indices[0], -1))
                    losses.append(torch.zeros_like(losses[0]))
                    continue
                layer._deferred, layer._given = deferred, given[q] if given else None
                quantized, ind, loss = layer(residual, freeze_codebook=freeze_codebook)
                residual = residual - quantized.detach()
                quantized_out = quantized_out + quantized
                all_indices.append(ind)
                losses.append(loss)
        finally:
            for layer in self.layers:
                layer._deferred, layer._given = None, None
        if deferred:
            update_deferred_stages(deferred, all_reduce=syncs)
        all_indices = torch.stack(all_indices, dim=-1)
        out = (self.project_out(quantized_out), all_indices, torch.stack(losses))
        return out + (self.get_codes_from_indices(all_indices),) if return_all_codes else out

    def _search_all_stages(self, x, last, with_stats) -> list[tuple] | None:
        """Each running stage's indices (flat) and, ``with_stats`` where the search pass
        gathers them (``ops.residual.fuses_stats``), the counts and sums of its residual, from
        one ``ops.residual_nearest_code(_with_stats)`` over the residuals in float32 (else
        the stage counts its own residual); None where the stages search one by one: a stage
        still to be k-means initialized (it reads its residual first), cosine similarity,
        feature maps.
        The stages then subtract their codes as vector-quantize-pytorch does (x + sg(q - x)),
        so a residual may differ from the fused one in its last bit: a near-tie may go the
        other way (the numerics contract of a search)."""
        layers = self.layers[:last + 1]
        if not self.fuse_stages or self.accept_image_fmap or x.dim() not in (2, 3) or any(
                layer._initted is not True or layer.use_cosine_sim for layer in layers):
            return None
        flat = x.detach().reshape(-1, self.codebook_dim).float()
        books = [layer.codebook for layer in layers]
        options = dict(precision=layers[0].precision, backend=layers[0].backend)
        deterministic = torch.are_deterministic_algorithms_enabled()
        with torch.no_grad():
            if not (with_stats and ops.residual.fuses_stats(flat, deterministic=deterministic,
                                                            backend=options["backend"])):
                return [(ind, None) for ind in ops.residual_nearest_code(flat, books,
                                                                         **options)[0].unbind(1)]
            indices, _, counts, sums = ops.residual_nearest_code_with_stats(
                flat, books, deterministic=deterministic, **options)
        return list(zip(indices.unbind(1), zip(counts, sums)))

    def _syncs_statistics(self) -> bool:
        """Do the stages all-reduce their batch statistics (VectorQuantize's sync_codebook)?"""
        return any(layer.sync_codebook for layer in self.layers)

    def _last_stage(self, device, seed) -> int:
        """The last stage this step runs: Q - 1, or the one quantize dropout draws."""
        if not (self.training and self.quantize_dropout):
            return self.num_quantizers - 1
        seed = _sync_seed(device) if seed is None else seed
        last = random.Random(seed).randrange(self.quantize_dropout_cutoff_index,
                                             self.num_quantizers)
        step = self.quantize_dropout_multiple_of
        return math.ceil((last + 1) / step) * step - 1

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (..., Q') with Q' <= Q (stages past Q' or marked -1: dropped) -> the codes
        (Q, ..., codebook_dim), zero for dropped stages."""
        if indices.shape[-1] > self.num_quantizers:
            raise ValueError(f"indices has {indices.shape[-1]} stages, this module "
                             f"{self.num_quantizers}")
        missing = self.num_quantizers - indices.shape[-1]
        if missing and not self.quantize_dropout:
            raise ValueError(f"indices has {indices.shape[-1]} of {self.num_quantizers} stages; "
                             "fewer are only valid with quantize_dropout")
        indices = nn.functional.pad(indices, (0, missing), value=-1)
        codes = [layer.codebook[ind] for layer, ind in
                 zip(self.layers, indices.clamp_min(0).unbind(-1))]
        return torch.stack(codes).masked_fill((indices < 0).movedim(-1, 0)[..., None], 0.0)

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """The quantized output of ``indices``: the sum of their codes, projected out."""
        return self.project_out(self.get_codes_from_indices(indices).sum(0))


def update_deferred_stages(deferred: list, all_reduce: bool) -> None:
    """The EMA steps the stages deferred: every stage's statistics (summed over the ranks in
    one all-reduce with ``all_reduce``), one ``ops.ema_update_stages_`` for the codebooks of
    the stages with an EMA update (on CUDA one launch pair for all), then each stage's rest
    (the statistics' moving average without one, dead-code restarts) in stage order.

    A stage's update changes only its own codebook, which no later stage of the same step
    reads, so updating after every stage has searched gives what updating each in turn
    gives. ``deferred``: (stage, batch, indices, ema_update, (counts, sums), or None where
    the stage's search made none) in stage order.
    """
    stats = [stage._local_stats(flat, ind) if stats is None else stats
             for stage, flat, ind, _, stats in deferred]
    if all_reduce:
        packed = torch.cat([torch.cat([counts[:, None], sums], dim=1) for counts, sums in stats])
        dist.all_reduce(packed)
        stats = [(part[:, 0], part[:, 1:]) for part in
                 packed.split([stage.codebook_size for stage, *_ in deferred])]
    together = [(stage, stage_stats) for (stage, *_, ema_update, _), stage_stats
                in zip(deferred, stats) if ema_update]
    # Stages of other options update one by one (ema_done below is then False).
    grouped = len({(stage.decay, stage.eps, stage.backend) for stage, _ in together}) == 1
    if grouped:
        books = [stage._codebook for stage, _ in together]
        first = together[0][0]
        ops.ema_update_stages_([book.cluster_size[0] for book in books],
                               [book.embed_avg[0] for book in books],
                               [book.embed[0] for book in books],
                               [stage_stats for _, stage_stats in together],
                               decay=first.decay, eps=first.eps, backend=first.backend)
    for (stage, flat, ind, ema_update, _), stage_stats in zip(deferred, stats):
        stage._update(flat, ind, ema_update, stage_stats, ema_done=grouped)


class ReferenceResidualVQ(ResidualVQ):
    """``ResidualVQ`` on the pure-PyTorch ``ReferenceVectorQuantize`` stages (parity twin)."""

    quantizer_class = ReferenceVectorQuantize
    fuse_stages = False


class GroupedResidualVQ(nn.Module):
    """Drop-in for vector-quantize-pytorch's ``GroupedResidualVQ``: the feature dim cut
    into ``groups`` chunks, each a ``ResidualVQ`` (keys ``rvqs.{g}.*``). Forward returns
    ``(quantized, indices (G, ..., Q), commit_losses (G, Q))`` (+ all codes)."""

    residual_class = ResidualVQ

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        super().__init__()
        if not isinstance(groups, int) or groups < 1 or dim % groups:
            raise ValueError(f"groups must be an int >= 1 dividing dim={dim}, got {groups!r}")
        self.dim, self.groups, self.accept_image_fmap = dim, groups, accept_image_fmap
        self.rvqs = nn.ModuleList(
            self.residual_class(dim=dim // groups, accept_image_fmap=accept_image_fmap, **kwargs)
            for _ in range(groups))

    @property
    def split_dim(self) -> int:
        return 1 if self.accept_image_fmap else -1

    @property
    def codebooks(self) -> torch.Tensor:
        return torch.stack([rvq.codebooks for rvq in self.rvqs])

    def forward(self, x: torch.Tensor, indices=None, return_all_codes: bool = False,
                sample_codebook_temp=None, freeze_codebook: bool = False, mask=None):
        if indices is not None or mask is not None:
            raise ValueError("indices and mask are not supported by vqkernels.GroupedResidualVQ")
        if x.dim() < 2 or x.shape[self.split_dim] != self.dim:
            raise ValueError(f"x must have dim={self.dim} features in dim {self.split_dim}, got "
                             f"shape {tuple(x.shape)}")
        # Theirs draws this seed in every training step, dropout or not: so do we, for the
        # same random stream.
        seed = _sync_seed(x.device) if self.training else None
        outs = [rvq(chunk, return_all_codes=return_all_codes, freeze_codebook=freeze_codebook,
                    rand_quantize_dropout_fixed_seed=seed)
                for rvq, chunk in zip(self.rvqs, x.chunk(self.groups, dim=self.split_dim))]
        quantized, indices, losses, *codes = zip(*outs)
        out = (torch.cat(quantized, dim=self.split_dim), torch.stack(indices), torch.stack(losses))
        return out + (torch.stack(codes[0]),) if return_all_codes else out

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.stack([rvq.get_codes_from_indices(ind)
                            for rvq, ind in zip(self.rvqs, indices)])

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.cat([rvq.get_output_from_indices(ind) for rvq, ind in zip(self.rvqs, indices)],
                         dim=self.split_dim)


class ReferenceGroupedResidualVQ(GroupedResidualVQ):
    """``GroupedResidualVQ`` on ``ReferenceResidualVQ`` groups (parity twin)."""

    residual_class = ReferenceResidualVQ
