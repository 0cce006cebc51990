"""Every metric against a direct reference computation on random tensors."""

import math

import numpy as np
import pytest
import torch

from prune.core import metrics as M


def ref_hsic_unbiased(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al. (2012) eq. 5, written out with explicit loops-free numpy but no shortcuts."""
    n = K.shape[0]
    K = K.copy()
    L = L.copy()
    np.fill_diagonal(K, 0.0)
    np.fill_diagonal(L, 0.0)
    one = np.ones(n)
    term1 = np.trace(K @ L)
    term2 = (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one @ K @ L @ one)
    return (term1 + term2 - term3) / (n * (n - 3))


def ref_cka(X: np.ndarray, Y: np.ndarray) -> float:
    K, L = X @ X.T, Y @ Y.T
    return ref_hsic_unbiased(K, L) / math.sqrt(ref_hsic_unbiased(K, K) * ref_hsic_unbiased(L, L))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def test_block_influence_matches_loop(gen):
    x = torch.randn(37, 16, generator=gen)
    y = torch.randn(37, 16, generator=gen)
    expected = 1 - np.mean([np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(x.numpy(), y.numpy())])
    assert M.block_influence(x, y).item() == pytest.approx(expected, abs=1e-12)
    assert M.block_influence(x, x).item() == pytest.approx(0.0, abs=1e-12)
    assert M.block_influence(x, -x).item() == pytest.approx(2.0, abs=1e-12)


def test_angular_distance_matches_loop(gen):
    x = torch.randn(29, 8, generator=gen)
    y = torch.randn(29, 8, generator=gen)
    expected = np.mean([
        math.acos(np.clip(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1)) / math.pi
        for a, b in zip(x.numpy().astype(np.float64), y.numpy().astype(np.float64))
    ])
    assert M.angular_distance(x, y).item() == pytest.approx(expected, abs=1e-12)
    assert M.angular_distance(x, -x).item() == pytest.approx(1.0, abs=1e-6)


def test_pairwise_angular_sum_matches_pairs(gen):
    states = torch.randn(5, 50, 12, generator=gen)
    total = M.pairwise_angular_sum(states, chunk=7)  # chunking must not change the sum
    for i in range(5):
        for j in range(5):
            assert total[i, j].item() / 50 == pytest.approx(M.angular_distance(states[i], states[j]).item(), abs=1e-6)


def test_hsic_unbiased_matches_reference(gen):
    X = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    Y = torch.randn(20, 9, generator=gen, dtype=torch.float64)
    K, L = X @ X.T, Y @ Y.T
    assert M.hsic_unbiased(K, L).item() == pytest.approx(ref_hsic_unbiased(K.numpy(), L.numpy()), rel=1e-10)


def test_linear_cka_matches_reference_and_invariances(gen):
    X = torch.randn(64, 10, generator=gen, dtype=torch.float64)
    Y = X @ torch.randn(10, 7, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(64, 7, generator=gen, dtype=torch.float64)
    value = M.linear_cka(X, Y).item()
    assert value == pytest.approx(ref_cka(X.numpy(), Y.numpy()), rel=1e-10)
    assert 0.0 < value < 1.0
    # CKA is invariant to isotropic scaling and orthogonal transforms, and CKA(X, X) = 1
    Q, _ = torch.linalg.qr(torch.randn(10, 10, generator=gen, dtype=torch.float64))
    assert M.linear_cka(3.0 * X @ Q, Y).item() == pytest.approx(value, rel=1e-9)
    assert M.linear_cka(X, X).item() == pytest.approx(1.0, rel=1e-12)


def test_cka_matrix_matches_pairwise(gen):
    states = torch.randn(6, 40, 12, generator=gen)
    states[3] = states[2] * 2 + 0.01 * torch.randn(40, 12, generator=gen)
    S = M.cka_matrix(states)
    for i in range(6):
        for j in range(6):
            assert S[i, j].item() == pytest.approx(ref_cka(states[i].double().numpy(), states[j].double().numpy()), abs=1e-9)
    assert S[2, 3].item() > 0.99


def test_cka_keeps_its_digits_under_a_large_common_offset(gen):
    """A vector added to every token leaves unbiased CKA unchanged; uncentred Grams lost it at 1000x
    the tokens' norm (0.607 for 0.612; 2.0 at 3000x). Float64 inputs are not modified."""
    X = torch.randn(128, 16, generator=gen, dtype=torch.float64)
    Y = torch.tanh(X @ torch.randn(16, 16, generator=gen, dtype=torch.float64) / 4) + 0.3 * torch.randn(
        128, 16, generator=gen, dtype=torch.float64)
    mu = torch.randn(16, generator=gen, dtype=torch.float64)
    mu /= mu.norm()
    clean = M.cka_matrix([X, Y])[0, 1].item()
    shifted = [X + 3000 * X.norm(dim=1).mean() * mu, Y + 3000 * Y.norm(dim=1).mean() * mu]
    copies = [x.clone() for x in shifted]
    assert M.cka_matrix(shifted)[0, 1].item() == pytest.approx(clean, abs=1e-9)
    assert M.linear_cka(*shifted).item() == pytest.approx(clean, abs=1e-9)
    assert all(torch.equal(a, b) for a, b in zip(shifted, copies))


def test_cka_needs_more_than_three_tokens(gen):
    with pytest.raises(ValueError, match="more than 3"):
        M.cka_matrix(torch.randn(2, 3, 4, generator=gen))


def test_msrs_matches_double_loop_and_tanh_form(gen):
    A = torch.rand(7, 7, generator=gen, dtype=torch.float64)
    S = (A + A.T) / 2
    S.fill_diagonal_(1.0)
    beta, tau = 100.0, 0.8
    result = M.msrs(S, beta, tau)
    total = 0.0
    contrib = [0.0] * 7
    for i in range(7):
        for j in range(7):
            if i == j:
                continue
            value = 0.5 * (math.tanh(beta * (S[i, j].item() - tau)) + 1)
            contrib[i] += value
            if i < j:
                total += value
    assert result.total == pytest.approx(total, rel=1e-10)
    assert result.per_pair == pytest.approx(total / 21, rel=1e-10)
    assert result.contributions == pytest.approx(contrib, rel=1e-10)
    assert sum(result.contributions) == pytest.approx(2 * total)


def test_msrs_soft_counts_similar_pairs():
    S = torch.full((4, 4), 0.1, dtype=torch.float64)
    S[0, 1] = S[1, 0] = 0.99
    S.fill_diagonal_(1.0)
    assert M.msrs(S).total == pytest.approx(1.0, abs=1e-6)
    assert M.msrs(S).contributions[:2] == pytest.approx([1.0, 1.0], abs=1e-6)


def test_running_mean_streams_and_drops_nan():
    acc = M.RunningMean((2,))
    acc.update(torch.tensor([1.0, float("nan")]))
    acc.update(torch.tensor([3.0, 5.0]))
    assert acc.mean.tolist() == [2.0, 5.0]
    assert acc.dropped.tolist() == [0, 1]
