"""Adaptive KL regularized fine-tuning loss (arXiv 2602.17546, "Learning to Stay Safe").

Per example ``i`` with response tokens ``t``::

    loss_i = w_i * CE_i + beta_i * KL_i
    CE_i   = mean_t  -log p_theta(y_t)
    KL_i   = mean_t  sum_v p_ref(v) * (log p_ref(v) - log p_theta(v))    # KL(pi_ref || pi_theta)
    loss   = mean_i loss_i   over rows with at least one response token

``w_i`` defaults to ``1 - beta_i`` (the paper's per-example mix); callers may pass explicit
weights, e.g. the paper rule clamps them to [0.1, 0.9] (see ``safety.schedules``).

Everything works on a *packed* form: only the N response positions, never the padded
[B, T, V] tensor, so memory stays bounded with 128k vocabularies. Shift convention: the
logits at position ``p`` of a sequence predict the token at ``p + 1``; a packed row ``n``
holds the logits of some position ``p`` and ``targets[n] == labels[row, p + 1]``.
Reference logits are needed only for tokens whose row has ``beta > 0``, so benign rows need
no reference forward at all. :func:`adaptive_kl_loss_from_hidden` takes final hidden states
and the output-head weight instead, so even the packed [N, V] logits exist one chunk at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossStats:
    """Plain floats for logging, over rows with response tokens: ``ce`` is the unweighted mean
    of per-row CE, ``kl`` the mean per-row KL of rows given reference logits (0.0 if none),
    ``ref_fraction`` the share of rows with ``beta > 0``."""

    loss: float
    ce: float
    kl: float
    beta_mean: float
    beta_max: float
    ref_fraction: float
    n_tokens: int


def response_positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Index the positions whose logits predict a response token.

    Causal shift: the logits at position ``p`` predict ``labels[:, p + 1]``. A position is
    returned when ``labels[row, p + 1] != -100``. Gather hidden states with
    ``hidden[rows, positions]`` before the lm_head; the matching targets are
    ``labels[rows, positions + 1]`` and the row ids are ``rows``.

    Args:
        labels: [B, T] token ids with ``-100`` on prompt and padding tokens.

    Returns:
        ``(rows, positions)``, two int64 tensors of shape [N] in row-major order.
    """
    rows, next_positions = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows, next_positions


def padded_to_packed(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pack padded logits into the response-only form ``adaptive_kl_loss`` takes.

    Applies the usual causal shift (``logits[:, :-1]`` predict ``labels[:, 1:]``).

    Args:
        logits: [B, T, V] logits of a causal LM.
        labels: [B, T] token ids, ``-100`` where no loss is wanted.

    Returns:
        ``(packed_logits [N, V], targets [N], row_ids [N])``.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits [B, T, V] and labels [B, T] disagree: {tuple(logits.shape)} vs "
            f"{tuple(labels.shape)}"
        )
    rows, positions = response_positions(labels)
    return logits[rows, positions], labels[rows, positions + 1], rows


def _token_terms(
    policy: Tensor, targets: Tensor, ref: Tensor, ref_index: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-token CE for a chunk and KL for its tokens at ``ref_index`` (float32)."""
    logp = F.log_softmax(policy.float(), dim=-1)
    ce = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if ref_index.numel() == 0:
        return ce, logp.new_zeros(0)
    ref_logp = F.log_softmax(ref.detach().float(), dim=-1)
    # kl_div(input, target, log_target) = exp(target) * (target - input): KL(ref || policy).
    kl = F.kl_div(logp[ref_index], ref_logp, reduction="none", log_target=True).sum(-1)
    return ce, kl


class _FusedTokenTerms(torch.autograd.Function):
    """Per-token CE and KL with a hand-written backward that keeps nothing but the inputs.

    With ``p = softmax(policy)`` and ``q = softmax(ref)``, per token
    ``d CE / d policy = p - onehot(target)`` and ``d KL(q || p) / d policy = p - q``. The
    backward recomputes ``p`` (and ``q`` for the reference tokens) once per chunk, instead of
    replaying the forward under autograd as activation checkpointing would: the same memory
    bound (no float32 [N, V] tensor outlives the chunk) for about half the extra work.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        policy: Tensor,
        targets: Tensor,
        ref: Tensor,
        ref_index: Tensor,
    ) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            ce, kl = _token_terms(policy, targets, ref, ref_index)
        ctx.save_for_backward(policy, targets, ref, ref_index)
        return ce, kl

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_ce: Tensor, grad_kl: Tensor
    ) -> tuple[Tensor | None, None, None, None]:
        policy, targets, ref, ref_index = ctx.saved_tensors  # type: ignore[attr-defined]
        probs = F.softmax(policy.float(), dim=-1)
        grad = probs * grad_ce.unsqueeze(-1)
        grad[torch.arange(len(targets), device=grad.device), targets] -= grad_ce
        if ref_index.numel():
            ref_probs = F.softmax(ref.detach().float(), dim=-1)
            grad.index_add_(0, ref_index, (probs[ref_index] - ref_probs) * grad_kl.unsqueeze(-1))
        return grad.to(policy.dtype), None, None, None


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(-1)`` for [n, V] tensors without the [n, V] product in memory."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class _FusedHeadTerms(torch.autograd.Function):
    """Per-token CE and KL from hidden states and a frozen head, gradients taken in forward.

    With ``p = softmax(h W^T)``, ``q = softmax(h_ref W^T)``:
    ``d CE / d h = (p - onehot(y)) W = p W - W[y]`` and ``d KL(q || p) / d h = p W - q W``.
    Both are [n, H]; backward only scales them by the incoming per-token gradients.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        ref_hidden: Tensor,
        ref_index: Tensor,
    ) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            logp = F.log_softmax(F.linear(hidden, weight).float(), dim=-1)
            ce = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            p_w = logp.exp().to(weight.dtype) @ weight
            grad_ce = (p_w - weight[targets]).to(hidden.dtype)
            kl, grad_kl = logp.new_zeros(0), hidden.new_zeros(0, hidden.shape[-1])
            if ref_index.numel():
                # Every [n, V] temporary here sits on top of the policy's saved activations,
                # so as few as possible: no copy of logp when the whole chunk has a reference
                # (a harmful row), and KL = q . (log q - log p) as row dot products.
                ref_logp = F.log_softmax(F.linear(ref_hidden, weight).float(), dim=-1)
                q = ref_logp.exp()
                logp_ref = logp if ref_index.numel() == logp.shape[0] else logp[ref_index]
                kl = _row_dot(q, ref_logp) - _row_dot(q, logp_ref)
                grad_kl = (p_w[ref_index] - q.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad_ce, grad_kl, ref_index)
        return ce, kl

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_ce_out: Tensor, grad_kl_out: Tensor
    ) -> tuple[Tensor | None, None, None, None, None]:
        grad_ce, grad_kl, ref_index = ctx.saved_tensors  # type: ignore[attr-defined]
        grad = grad_ce * grad_ce_out.unsqueeze(-1).to(grad_ce.dtype)
        if ref_index.numel():
            grad.index_add_(0, ref_index, grad_kl * grad_kl_out.unsqueeze(-1).to(grad_kl.dtype))
        return grad, None, None, None, None


def _check_inputs(
    policy_logits: Tensor,
    targets: Tensor,
    row_ids: Tensor,
    betas: Tensor,
    ref_logits: Tensor | None,
    ref_token_mask: Tensor | None,
    sft_weights: Tensor | None,
) -> Tensor:
    """Validate shapes and reference coverage; return the boolean ref mask [N]."""
    n, weights = policy_logits.shape[0], betas if sft_weights is None else sft_weights
    shapes = [tuple(t.shape) for t in (policy_logits, targets, row_ids, betas, weights)]
    if policy_logits.dim() != 2 or shapes[1:3] != [(n,), (n,)] or shapes[3:] != [(len(betas),)] * 2:
        raise ValueError(
            f"expected policy_logits [N, V], targets [N], row_ids [N], betas [B], sft_weights [B];"
            f" got {', '.join(map(str, shapes))}"
        )
    if n and not 0 <= int(row_ids.min()) <= int(row_ids.max()) < len(betas):
        raise ValueError(f"row_ids must lie in [0, {len(betas)}), got {row_ids.unique().tolist()}")
    if bool((betas < 0).any()):
        raise ValueError(f"betas must be >= 0, got {betas.tolist()}")
    needs_ref = betas.to(row_ids.device)[row_ids] > 0
    if ref_logits is None:
        if bool(needs_ref.any()):
            raise ValueError(
                f"ref_logits is None but {int(needs_ref.sum())} response tokens belong to rows "
                f"with beta > 0 (betas={betas.tolist()}); pass reference logits for them"
            )
        return torch.zeros_like(needs_ref)
    mask = needs_ref if ref_token_mask is None else ref_token_mask.to(torch.bool)
    if mask.shape != (n,) or int(mask.sum()) != ref_logits.shape[0]:
        raise ValueError(
            f"ref_token_mask must be [N]={n} with one True per ref_logits row; got mask "
            f"{tuple(mask.shape)} with {int(mask.sum())} True, ref_logits {tuple(ref_logits.shape)}"
        )
    if bool((needs_ref & ~mask).any()):
        raise ValueError(
            f"ref_token_mask leaves out {int((needs_ref & ~mask).sum())} tokens of rows with "
            f"beta > 0 (betas={betas.tolist()})"
        )
    return mask


def adaptive_kl_loss(
    policy_logits: Tensor,
    targets: Tensor,
    row_ids: Tensor,
    betas: Tensor,
    ref_logits: Tensor | None = None,
    ref_token_mask: Tensor | None = None,
    sft_weights: Tensor | None = None,
    chunk_size: int = 4096,
    checkpoint_chunks: bool | None = None,
) -> tuple[Tensor, LossStats]:
    """Adaptive KL regularized loss on packed response tokens.

    Log-softmaxes are computed in float32, ``chunk_size`` tokens at a time. With
    ``checkpoint_chunks`` each chunk runs through a fused function whose hand-written backward
    recomputes the softmaxes, so autograd keeps only views of the given logits instead of ~3
    float32 [N, V] copies (log-probs of both sides): one extra softmax per side and chunk for
    gigabytes at 128k vocabularies. ``None`` turns it on whenever ``policy_logits`` requires
    grad. Either way ``ref_logits`` stays alive until backward; free the caller's other
    references to it.

    Args:
        policy_logits: [N, V] policy logits at the response positions (row n predicts
            ``targets[n]``; see ``padded_to_packed``). Any float dtype.
        targets: [N] target token ids.
        row_ids: [N] example index of each token, in [0, B).
        betas: [B] KL weights, >= 0.
        ref_logits: [M, V] reference logits for the tokens selected by ``ref_token_mask``, in
            order. May be None only if no token belongs to a row with beta > 0. Never
            receives gradient.
        ref_token_mask: [N] bool, which tokens ``ref_logits`` covers; defaults to the tokens of
            rows with beta > 0. Must cover at least those.
        sft_weights: [B] CE weights; defaults to ``1 - betas``.
        chunk_size: tokens per log-softmax chunk.
        checkpoint_chunks: recompute chunks in backward (see above).

    Returns:
        ``(loss, stats)``: the scalar float32 loss and its ``LossStats``.

    Raises:
        ValueError: on inconsistent shapes, negative betas, or missing reference logits.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    mask = _check_inputs(
        policy_logits, targets, row_ids, betas, ref_logits, ref_token_mask, sft_weights
    )
    if checkpoint_chunks is None:
        checkpoint_chunks = policy_logits.requires_grad and torch.is_grad_enabled()
    terms = _FusedTokenTerms.apply if checkpoint_chunks else _token_terms
    ce_tok, kl_tok = _chunked_terms(terms, policy_logits, targets, ref_logits, mask, chunk_size)
    return _reduce(policy_logits, ce_tok, kl_tok, row_ids, mask, betas, sft_weights)


def adaptive_kl_loss_from_hidden(
    policy_hidden: Tensor,
    head_weight: Tensor,
    targets: Tensor,
    row_ids: Tensor,
    betas: Tensor,
    ref_hidden: Tensor | None = None,
    ref_token_mask: Tensor | None = None,
    sft_weights: Tensor | None = None,
    chunk_size: int = 4096,
) -> tuple[Tensor, LossStats]:
    """:func:`adaptive_kl_loss` with the output head folded in: takes the final hidden states
    at the response positions and the (frozen, bias-free) head weight instead of logits.

    Each chunk's logits exist only inside the chunk: the forward computes CE, KL and, right
    away, their gradients with respect to the hidden states (``(p - onehot(y)) W`` and
    ``(p - q) W``, [chunk, H] each), and keeps only those for backward. No [N, V] tensor
    outlives its chunk, for the policy or the reference, so with a 49k vocabulary and ~700
    response tokens about 140 MB of float32 logits per side never stay resident, and backward
    is two multiply-adds on [N, H] instead of a softmax replay. Gradients reach
    ``policy_hidden`` only; ``head_weight`` must not need one (LoRA leaves the head frozen).

    Args:
        policy_hidden: [N, H] final hidden states at the response positions.
        head_weight: [V, H] output-head weight (``lm_head.weight``).
        ref_hidden: [M, H] the reference model's hidden states for the tokens selected by
            ``ref_token_mask`` (see :func:`adaptive_kl_loss` for the rest).

    Raises:
        ValueError: as :func:`adaptive_kl_loss`, or the head weight requires grad or does not
            match the hidden size.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if head_weight.requires_grad:
        raise ValueError(
            "head_weight requires grad: the fused head computes no gradient for it; use "
            "adaptive_kl_loss on logits when the output head is trained"
        )
    if head_weight.dim() != 2 or head_weight.shape[1] != policy_hidden.shape[-1]:
        raise ValueError(
            f"head_weight must be [V, H] with H={policy_hidden.shape[-1]}, got "
            f"{tuple(head_weight.shape)}"
        )
    mask = _check_inputs(
        policy_hidden, targets, row_ids, betas, ref_hidden, ref_token_mask, sft_weights
    )

    def terms(hidden: Tensor, chunk_targets: Tensor, ref: Tensor, ref_index: Tensor):
        return _FusedHeadTerms.apply(hidden, head_weight, chunk_targets, ref, ref_index)

    ce_tok, kl_tok = _chunked_terms(terms, policy_hidden, targets, ref_hidden, mask, chunk_size)
    return _reduce(policy_hidden, ce_tok, kl_tok, row_ids, mask, betas, sft_weights)


def _chunked_terms(
    terms: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]],
    policy: Tensor,
    targets: Tensor,
    ref: Tensor | None,
    mask: Tensor,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """Per-token CE [N] and KL [N] (0 where ``mask`` is False), ``chunk_size`` tokens at a time.

    ``policy`` and ``ref`` are logits or hidden states, whatever ``terms`` takes; ``ref`` rows
    follow ``mask`` in token order.
    """
    n = policy.shape[0]
    bounds = [*range(0, n, chunk_size), n]
    # ref rows follow the mask in token order: its running count maps chunks to rows.
    ref_count = torch.cat([mask.new_zeros(1, dtype=torch.long), mask.long().cumsum(0)])
    ref_offsets = ref_count[bounds].tolist()
    no_ref = policy.new_zeros(0, policy.shape[-1])
    ce_parts, kl_parts = [], []
    for i, (start, stop) in enumerate(itertools.pairwise(bounds)):
        chunk_ref = no_ref if ref is None else ref[ref_offsets[i] : ref_offsets[i + 1]]
        ref_index = mask[start:stop].nonzero(as_tuple=True)[0]
        ce, kl = terms(policy[start:stop], targets[start:stop], chunk_ref, ref_index)
        ce_parts.append(ce)
        kl_parts.append(kl)
    ce_tok = torch.cat(ce_parts) if ce_parts else policy.new_zeros(0, dtype=torch.float32)
    kl_tok = ce_tok.new_zeros(n)
    if kl_parts:
        kl_tok = kl_tok.index_put((mask.nonzero(as_tuple=True)[0],), torch.cat(kl_parts))
    return ce_tok, kl_tok


def _reduce(
    policy_logits: Tensor,
    ce_tok: Tensor,
    kl_tok: Tensor,
    row_ids: Tensor,
    mask: Tensor,
    betas: Tensor,
    sft_weights: Tensor | None,
) -> tuple[Tensor, LossStats]:
    """Per-row means, the weighted mix, and the stats."""
    b = betas.shape[0]
    betas = betas.to(ce_tok.device, torch.float32)
    weights = 1 - betas if sft_weights is None else sft_weights.to(ce_tok.device, torch.float32)
    counts = torch.bincount(row_ids, minlength=b).to(torch.float32)
    valid = counts > 0
    ce_row = ce_tok.new_zeros(b).index_add(0, row_ids, ce_tok) / counts.clamp(min=1)
    kl_row = kl_tok.new_zeros(b).index_add(0, row_ids, kl_tok) / counts.clamp(min=1)
    if not bool(valid.any()):
        # Keep the graph connected so a caller's backward() stays a no-op, not an error.
        zero = policy_logits.sum().float() * 0.0
        return zero, LossStats(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)
    loss = (weights * ce_row + betas * kl_row)[valid].mean()
    has_ref = valid & (torch.bincount(row_ids[mask], minlength=b) > 0)
    stats = LossStats(
        loss=float(loss.detach()),
        ce=float(ce_row[valid].detach().mean()),
        kl=float(kl_row[has_ref].detach().mean()) if bool(has_ref.any()) else 0.0,
        beta_mean=float(betas[valid].mean()),
        beta_max=float(betas[valid].max()),
        ref_fraction=float((betas[valid] > 0).float().mean()),
        n_tokens=int(row_ids.numel()),
    )
    return loss, stats
