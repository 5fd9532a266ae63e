"""Adaptive KL loss, checked against numbers worked out by hand (torchtune test_dpo_loss style)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from safety.regularizer import (
    adaptive_kl_loss,
    adaptive_kl_loss_from_hidden,
    padded_to_packed,
    response_positions,
)

LN2 = math.log(2)
# Distributions whose logs are multiples of ln 2, so CE and KL come out as k * ln 2.
P_HALF = [1 / 2, 1 / 4, 1 / 8, 1 / 8]
P_FLAT = [1 / 4] * 4
P_LAST = [1 / 8, 1 / 8, 1 / 4, 1 / 2]


def _logits(*dists: list[float], offset: float = 3.0) -> torch.Tensor:
    # An offset changes nothing after softmax; it proves the loss normalises the logits.
    return torch.tensor([[math.log(p) + offset for p in d] for d in dists])


def _hand_example() -> dict:
    """Two rows, three response tokens, vocab 4.

    token 0 (row 0): policy P_HALF, target 0 -> CE = ln2;  ref P_FLAT -> KL = ln2 / 4
    token 1 (row 0): policy P_FLAT, target 3 -> CE = 2ln2; ref P_HALF -> KL = ln2 / 4
    token 2 (row 1): policy P_LAST, target 2 -> CE = 2ln2; ref P_HALF ->
        KL = 1/2 ln(4) + 1/4 ln(2) + 1/8 ln(1/2) + 1/8 ln(1/4) = 0.875 ln2
    row 0: CE = 1.5 ln2, KL = 0.25 ln2;  row 1: CE = 2 ln2, KL = 0.875 ln2
    """
    return {
        "policy_logits": _logits(P_HALF, P_FLAT, P_LAST),
        "targets": torch.tensor([0, 3, 2]),
        "row_ids": torch.tensor([0, 0, 1]),
        "ref_logits": _logits(P_FLAT, P_HALF, P_HALF, offset=-1.0),
    }


def test_hand_computed_loss_and_stats():
    ex = _hand_example()
    loss, stats = adaptive_kl_loss(**ex, betas=torch.tensor([0.2, 0.5]))
    # row 0: 0.8 * 1.5 ln2 + 0.2 * 0.25 ln2 = 1.25 ln2
    # row 1: 0.5 * 2 ln2 + 0.5 * 0.875 ln2 = 1.4375 ln2
    expected = (1.25 + 1.4375) / 2 * LN2
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats.loss == pytest.approx(expected, abs=1e-6)
    assert stats.ce == pytest.approx(1.75 * LN2, abs=1e-6)
    assert stats.kl == pytest.approx((0.25 + 0.875) / 2 * LN2, abs=1e-6)
    assert stats.beta_mean == pytest.approx(0.35)
    assert stats.beta_max == pytest.approx(0.5)
    assert stats.ref_fraction == 1.0
    assert stats.n_tokens == 3


def test_explicit_sft_weights_replace_one_minus_beta():
    ex = _hand_example()
    loss, _ = adaptive_kl_loss(
        **ex, betas=torch.tensor([0.2, 0.5]), sft_weights=torch.tensor([0.1, 0.9])
    )
    # row 0: 0.1 * 1.5 ln2 + 0.2 * 0.25 ln2 = 0.2 ln2
    # row 1: 0.9 * 2 ln2 + 0.5 * 0.875 ln2 = 2.2375 ln2
    assert loss.item() == pytest.approx((0.2 + 2.2375) / 2 * LN2, abs=1e-6)


def test_kl_is_zero_when_reference_equals_policy():
    ex = _hand_example()
    ex["ref_logits"] = ex["policy_logits"].clone()
    loss, stats = adaptive_kl_loss(**ex, betas=torch.tensor([0.5, 0.5]))
    assert stats.kl == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * 1.75 * LN2, abs=1e-6)


def test_zero_betas_give_plain_cross_entropy_without_reference():
    ex = _hand_example()
    del ex["ref_logits"]
    loss, stats = adaptive_kl_loss(**ex, betas=torch.zeros(2))
    assert loss.item() == pytest.approx(1.75 * LN2, abs=1e-6)
    per_row = [
        F.cross_entropy(ex["policy_logits"][:2], ex["targets"][:2]),
        F.cross_entropy(ex["policy_logits"][2:], ex["targets"][2:]),
    ]
    assert loss.item() == pytest.approx(float(sum(per_row)) / 2, abs=1e-6)
    assert (stats.kl, stats.ref_fraction, stats.beta_max) == (0.0, 0.0, 0.0)


def test_only_rows_with_positive_beta_need_reference_logits():
    ex = _hand_example()
    # Row 0 has beta 0: reference logits are given for row 1's single token only.
    loss, stats = adaptive_kl_loss(
        ex["policy_logits"],
        ex["targets"],
        ex["row_ids"],
        betas=torch.tensor([0.0, 0.5]),
        ref_logits=ex["ref_logits"][2:],
    )
    # row 0: plain CE 1.5 ln2; row 1: 1.4375 ln2 as above
    assert loss.item() == pytest.approx((1.5 + 1.4375) / 2 * LN2, abs=1e-6)
    assert stats.kl == pytest.approx(0.875 * LN2, abs=1e-6)  # only row 1 had a reference
    assert stats.ref_fraction == 0.5
    # Extra reference logits for the beta-0 row are accepted and change nothing.
    everywhere = torch.ones(3, dtype=torch.bool)
    full, _ = adaptive_kl_loss(**ex, betas=torch.tensor([0.0, 0.5]), ref_token_mask=everywhere)
    assert full.item() == pytest.approx(loss.item(), abs=1e-7)


def test_rows_without_response_tokens_are_excluded():
    ex = _hand_example()
    ex["row_ids"] = torch.tensor([0, 0, 2])  # row 1 has no tokens
    loss, stats = adaptive_kl_loss(**ex, betas=torch.tensor([0.2, 0.9, 0.5]))
    assert loss.item() == pytest.approx((1.25 + 1.4375) / 2 * LN2, abs=1e-6)
    assert stats.beta_max == pytest.approx(0.5)


def test_no_response_tokens_at_all_gives_zero_loss_that_backpropagates():
    logits = torch.zeros(0, 4, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long)
    loss, stats = adaptive_kl_loss(logits, empty, empty, betas=torch.zeros(2))
    loss.backward()
    assert loss.item() == 0.0 and stats.n_tokens == 0


def test_missing_reference_with_positive_beta_raises_naming_betas():
    ex = _hand_example()
    del ex["ref_logits"]
    with pytest.raises(ValueError, match=r"ref_logits is None.*betas=\[0\.0, 0\.5\]"):
        adaptive_kl_loss(**ex, betas=torch.tensor([0.0, 0.5]))


def test_reference_mask_must_cover_rows_with_positive_beta():
    ex = _hand_example()
    mask = torch.tensor([True, False, True])
    with pytest.raises(ValueError, match="leaves out 1 tokens"):
        adaptive_kl_loss(
            **{**ex, "ref_logits": ex["ref_logits"][[0, 2]]},
            betas=torch.tensor([0.2, 0.5]),
            ref_token_mask=mask,
        )


def _random_case(seed: int, n: int = 23, vocab: int = 11, rows: int = 5) -> dict:
    gen = torch.Generator().manual_seed(seed)
    row_ids = torch.randint(0, rows, (n,), generator=gen).sort().values
    betas = torch.tensor([0.0, 0.3, 0.0, 0.9, 0.5])[:rows]
    mask = betas[row_ids] > 0
    return {
        "policy_logits": torch.randn(n, vocab, generator=gen),
        "targets": torch.randint(0, vocab, (n,), generator=gen),
        "row_ids": row_ids,
        "betas": betas,
        "ref_logits": torch.randn(int(mask.sum()), vocab, generator=gen),
    }


def _numpy_reference_loss(case: dict) -> float:
    """Independent float64 implementation of the documented formula."""
    logits = case["policy_logits"].double().numpy()
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets, rows = case["targets"].numpy(), case["row_ids"].numpy()
    betas = case["betas"].double().numpy()
    ref = iter(case["ref_logits"].double().numpy())
    ce, kl = np.zeros(len(targets)), np.zeros(len(targets))
    for n, (t, r) in enumerate(zip(targets, rows, strict=True)):
        ce[n] = -logp[n, t]
        if betas[r] > 0:
            ref_logits = next(ref)
            ref_logp = ref_logits - np.log(np.exp(ref_logits).sum())
            kl[n] = (np.exp(ref_logp) * (ref_logp - logp[n])).sum()
    per_row = [
        (1 - betas[r]) * ce[rows == r].mean() + betas[r] * kl[rows == r].mean()
        for r in np.unique(rows)
    ]
    return float(np.mean(per_row))


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_independent_numpy_implementation(seed):
    case = _random_case(seed)
    loss, _ = adaptive_kl_loss(**case, chunk_size=4)
    assert loss.item() == pytest.approx(_numpy_reference_loss(case), abs=1e-5)


@pytest.mark.parametrize("checkpoint_chunks", [True, False])
def test_chunked_equals_unchunked_including_gradients(checkpoint_chunks):
    case = _random_case(3)
    results = []
    for chunk_size in (1, 4, 10_000):
        logits = case["policy_logits"].clone().requires_grad_(True)
        loss, stats = adaptive_kl_loss(
            **{**case, "policy_logits": logits},
            chunk_size=chunk_size,
            checkpoint_chunks=checkpoint_chunks,
        )
        loss.backward()
        results.append((loss.detach(), logits.grad, stats))
    base_loss, base_grad, base_stats = results[-1]
    for loss, grad, stats in results[:-1]:
        torch.testing.assert_close(loss, base_loss, atol=1e-6, rtol=0)
        torch.testing.assert_close(grad, base_grad, atol=1e-6, rtol=0)
        assert stats.kl == pytest.approx(base_stats.kl, abs=1e-6)


def test_gradient_reaches_policy_but_not_reference():
    ex = _hand_example()
    policy = ex["policy_logits"].requires_grad_(True)
    ref = ex["ref_logits"].requires_grad_(True)
    loss, _ = adaptive_kl_loss(**ex, betas=torch.tensor([0.2, 0.5]))
    loss.backward()
    assert policy.grad is not None and policy.grad.abs().sum() > 0
    assert ref.grad is None


def test_bf16_logits_are_computed_in_float32():
    case = _random_case(4)
    bf16 = {**case, "policy_logits": case["policy_logits"].bfloat16().requires_grad_(True)}
    bf16["ref_logits"] = case["ref_logits"].bfloat16()
    loss, _ = adaptive_kl_loss(**bf16, chunk_size=5)
    loss.backward()
    assert loss.dtype == torch.float32
    assert bf16["policy_logits"].grad.dtype == torch.bfloat16
    rounded = {**case, "policy_logits": bf16["policy_logits"].detach().float()}
    rounded["ref_logits"] = bf16["ref_logits"].float()
    assert loss.item() == pytest.approx(_numpy_reference_loss(rounded), abs=1e-5)


def test_response_positions_apply_the_causal_shift():
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, -100, -100, -100]])
    rows, positions = response_positions(labels)
    # Position p predicts labels[:, p + 1]: row 0's tokens at 2, 3 come from positions 1, 2.
    assert rows.tolist() == [0, 0, 1]
    assert positions.tolist() == [1, 2, 0]
    assert labels[rows, positions + 1].tolist() == [7, 8, 5]


def test_padded_to_packed_matches_padded_cross_entropy():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 5, 6, generator=gen)
    labels = torch.tensor([[-100, -100, 1, 2, -100], [-100, 3, 4, 5, 0]])
    packed, targets, row_ids = padded_to_packed(logits, labels)
    assert packed.shape == (6, 6)
    loss, _ = adaptive_kl_loss(packed, targets, row_ids, betas=torch.zeros(2))
    per_row = [F.cross_entropy(logits[b, :-1], labels[b, 1:], ignore_index=-100) for b in (0, 1)]
    assert loss.item() == pytest.approx(float(sum(per_row)) / 2, abs=1e-6)


def test_checkpointed_chunks_save_no_float32_copies_for_backward():
    case = _random_case(6, n=32, vocab=1000)
    logits = case["policy_logits"].requires_grad_(True)
    inputs = {logits.untyped_storage().data_ptr(), case["ref_logits"].untyped_storage().data_ptr()}
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        adaptive_kl_loss(**case, chunk_size=8, checkpoint_chunks=True)
    large = [t for t in saved if t.numel() >= 1000]
    assert large, "expected the chunk inputs to be saved"
    assert {t.untyped_storage().data_ptr() for t in large} <= inputs


# --- the fused output head: hidden states in, logits never kept -----------------------------


def _hidden_case(seed: int, n: int = 23, hidden: int = 6, vocab: int = 11) -> dict:
    case = _random_case(seed, n=n, vocab=vocab)
    gen = torch.Generator().manual_seed(seed + 100)
    mask = case["betas"][case["row_ids"]] > 0
    return {
        "policy_hidden": torch.randn(n, hidden, generator=gen, dtype=torch.float64),
        "head_weight": torch.randn(vocab, hidden, generator=gen, dtype=torch.float64),
        "targets": case["targets"],
        "row_ids": case["row_ids"],
        "betas": case["betas"],
        "ref_hidden": torch.randn(int(mask.sum()), hidden, generator=gen, dtype=torch.float64),
    }


@pytest.mark.parametrize("chunk_size", [1, 4, 10_000])
@pytest.mark.parametrize("sft_weights", [None, torch.tensor([1.0, 0.2, 0.7, 0.1, 0.5])])
def test_fused_head_matches_logits_loss_and_gradients(chunk_size, sft_weights):
    """Same loss, stats and gradient with respect to the hidden states as running the head
    first and the logits loss after (both take their softmaxes in float32)."""
    case = _hidden_case(7)
    weight = case["head_weight"]
    h_fused = case["policy_hidden"].clone().requires_grad_(True)
    loss_fused, stats_fused = adaptive_kl_loss_from_hidden(
        **{**case, "policy_hidden": h_fused}, sft_weights=sft_weights, chunk_size=chunk_size
    )
    loss_fused.backward()

    h_plain = case["policy_hidden"].clone().requires_grad_(True)
    loss_plain, stats_plain = adaptive_kl_loss(
        h_plain @ weight.T,
        case["targets"],
        case["row_ids"],
        case["betas"],
        ref_logits=case["ref_hidden"] @ weight.T,
        sft_weights=sft_weights,
    )
    loss_plain.backward()

    torch.testing.assert_close(loss_fused, loss_plain, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(h_fused.grad, h_plain.grad, atol=1e-6, rtol=1e-5)
    assert stats_fused.kl == pytest.approx(stats_plain.kl, abs=1e-6)
    assert stats_fused.ce == pytest.approx(stats_plain.ce, abs=1e-6)


def test_fused_head_without_reference_rows_is_plain_cross_entropy():
    case = _hidden_case(8)
    zeros = torch.zeros_like(case["betas"])
    hidden = case["policy_hidden"].requires_grad_(True)
    loss, stats = adaptive_kl_loss_from_hidden(
        hidden, case["head_weight"], case["targets"], case["row_ids"], zeros, chunk_size=5
    )
    loss.backward()
    per_token = F.cross_entropy(
        hidden.detach() @ case["head_weight"].T, case["targets"], reduction="none"
    )
    rows = case["row_ids"]
    per_row = torch.zeros(5, dtype=torch.float64).index_add(0, rows, per_token)
    counts = torch.bincount(rows, minlength=5)
    expected = (per_row[counts > 0] / counts[counts > 0]).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert stats.ref_fraction == 0.0 and hidden.grad.abs().sum() > 0


def test_fused_head_keeps_no_vocabulary_sized_tensor_for_backward():
    case = _hidden_case(9, n=40, hidden=4, vocab=500)
    hidden = case["policy_hidden"].requires_grad_(True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        adaptive_kl_loss_from_hidden(**{**case, "policy_hidden": hidden}, chunk_size=8)
    assert saved and all(t.shape[-1] != 500 for t in saved)


def test_fused_head_refuses_a_trainable_head():
    case = _hidden_case(10)
    case["head_weight"].requires_grad_(True)
    with pytest.raises(ValueError, match="requires grad"):
        adaptive_kl_loss_from_hidden(**case)
