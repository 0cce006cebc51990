"""Redundancy metrics: small pure functions over tensors, and running accumulators.

Notation: ``h_0 .. h_L`` are the hidden states of one batch of tokens; ``h_l`` enters
block ``l`` (0-based) and ``h_{l+1}`` leaves it, so ``h_L`` is the last block's output
*before* the final norm. A state is ``[T, d]`` (T tokens) or ``[m, T, d]`` (m states).
Every function computes in float64 whatever the input dtype.

* Block Influence (ShortGPT): ``BI_l = 1 - mean_t cos(h_l[t], h_{l+1}[t])``.
* Angular distance (Gromov et al.): ``d(l, n) = mean_t arccos(cos(h_l[t], h_{l+n}[t])) / pi``.
* Unbiased linear CKA (RedTest; Song et al. 2012 HSIC): with ``K = X X^T``, ``L = Y Y^T``
  over the ``n > 3`` tokens of a batch and their diagonals zeroed,
  ``HSIC_u(K, L) = [tr(K L) + (1^T K 1)(1^T L 1)/((n-1)(n-2)) - 2/(n-2) 1^T K L 1] / (n(n-3))``
  and ``CKA(X, Y) = HSIC_u(K, L) / sqrt(HSIC_u(K, K) HSIC_u(L, L))``.
* MSRS (RedTest): ``MSRS = sum_{i<j} sigmoid(2 beta (S_ij - tau))`` over the L x L CKA
  matrix of block outputs; block ``i`` contributes its row sum ``sum_{j != i}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

F64 = torch.float64
CPU_CHUNK = 32  # tokens per step of cosine_sums on a CPU: the float64 chunk stays in cache (measured fastest)
DEVICE_CHUNK_BYTES = 256 * 2**20  # elsewhere (a GPU): chunks of this size, so a batch is a few kernel launches


def cosine_chunk(device: torch.device, m: int, d: int) -> int:
    """Tokens per step of :func:`cosine_sums` for ``m`` states of width ``d`` on ``device``:
    ``CPU_CHUNK`` on a CPU; elsewhere as many as fit in ``DEVICE_CHUNK_BYTES`` of float64 states
    and Grams (``8 t (m d + m^2)`` bytes), at least ``CPU_CHUNK``: on a GPU the per-chunk kernel
    launches, not the arithmetic, bound small chunks (32-token chunks made BI + angular scoring
    3x a forward pass on an H200)."""
    if torch.device(device).type == "cpu":
        return CPU_CHUNK
    return max(CPU_CHUNK, DEVICE_CHUNK_BYTES // (8 * (m * d + m * m)))


def cosine_per_token(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``cos(a[t], b[t])`` for every token ``t`` (last dim is the feature dim), float64."""
    a, b = a.to(F64), b.to(F64)
    num = (a * b).sum(-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return num / den.clamp_min(eps)


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """``BI = 1 - mean_t cos(x_in[t], x_out[t])`` (ShortGPT). Inputs ``[..., T, d]``."""
    return 1.0 - cosine_per_token(x_in, x_out).mean(-1)


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``mean_t arccos(cos(a[t], b[t])) / pi`` (Gromov et al.), in [0, 1]."""
    return torch.arccos(cosine_per_token(a, b).clamp(-1.0, 1.0)).mean(-1) / math.pi


def pairwise_angular_sum(states: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """``A[i, j] = sum_t arccos(cos(states[i, t], states[j, t])) / pi`` for ``states [m, T, d]``.

    Returns the *sum* over tokens (divide by T for the mean); computed ``chunk`` tokens
    at a time so memory stays ``O(chunk * m^2)`` (see :func:`cosine_sums`).
    """
    return cosine_sums(states, pairs=True, chunk=chunk)[1]


def _chunk64(states, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of every state ``[T, d]`` in ``states`` as one float64 token-major
    ``[t, m, d]`` tensor (one cast-and-copy pass; nothing else is materialised)."""
    u = torch.empty((stop - start, len(states), states[0].shape[-1]), dtype=F64, device=states[0].device)
    for i, x in enumerate(states):
        u[:, i].copy_(x[start:stop])
    return u


def cosine_sums(states, pairs: bool = True, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block Influence and angular sums of ``m`` states ``[T, d]`` (a list, or a tensor ``[m, T, d]``).

    Returns ``(bi, ang)``: ``bi[l] = sum_t (1 - cos(states[l][t], states[l+1][t]))`` for
    ``l < m - 1`` and, when ``pairs``, ``ang[i, j] = sum_t arccos(cos(states[i][t], states[j][t])) / pi``
    (else ``None``). Per ``chunk`` tokens (default :func:`cosine_chunk`) the states are cast to
    float64 once, token-major (``[t, m, d]``), and the Gram matrices ``G_t = X_t X_t^T`` come from
    one batched matrix product; ``cos_ij = G_ij / sqrt(G_ii G_jj)`` (zero vectors give 0), so no
    normalised copy is made. The consecutive cosines are the super-diagonal. Memory:
    ``8 chunk (m d + m^2)`` bytes. Sums over tokens (divide by T).
    """
    m, T = len(states), states[0].shape[0]
    device = states[0].device
    chunk = chunk or cosine_chunk(device, m, states[0].shape[-1])
    bi = torch.zeros(m - 1, dtype=F64, device=device)
    ang = torch.zeros(m, m, dtype=F64, device=device) if pairs else None
    idx = torch.arange(m - 1, device=device)
    for start in range(0, T, chunk):
        x = _chunk64(states, start, min(start + chunk, T))
        if pairs:
            cos = torch.bmm(x, x.transpose(1, 2))  # [t, m, m] Gram matrices
            norm = torch.diagonal(cos, dim1=1, dim2=2).sqrt().clamp_min(1e-12)  # [t, m]
            cos.div_(norm[:, :, None]).div_(norm[:, None, :])
            bi += (1.0 - cos[:, idx, idx + 1]).sum(0)
            ang += torch.arccos(cos.clamp_(-1.0, 1.0)).sum(0)
        else:
            norm = torch.linalg.vector_norm(x, dim=-1).clamp_min_(1e-12)  # [t, m]
            dots = (x[:, :-1] * x[:, 1:]).sum(-1)
            bi += (1.0 - dots / (norm[:, :-1] * norm[:, 1:])).sum(0)
    return bi, (ang / math.pi if pairs else None)


def hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC of two ``[..., n, n]`` Gram matrices (diagonals are zeroed here), n > 3."""
    n = K.shape[-1]
    if n <= 3:
        raise ValueError(f"unbiased HSIC needs more than 3 samples, got {n}")
    K = K.to(F64) - torch.diag_embed(torch.diagonal(K, dim1=-2, dim2=-1).to(F64))
    L = L.to(F64) - torch.diag_embed(torch.diagonal(L, dim1=-2, dim2=-1).to(F64))
    trace_kl = (K * L.transpose(-1, -2)).sum((-1, -2))
    sum_k, sum_l = K.sum((-1, -2)), L.sum((-1, -2))
    k1, l1 = K.sum(-1), L.sum(-1)  # K 1 and L 1 (K, L symmetric)
    kl1 = (k1 * l1).sum(-1)  # 1^T K L 1
    return (trace_kl + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * kl1) / (n * (n - 3))


def linear_cka(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Unbiased linear CKA between ``X [n, d1]`` and ``Y [n, d2]`` (widths may differ)."""
    X, Y = X.to(F64), Y.to(F64)
    X, Y = X - X.mean(0), Y - Y.mean(0)  # unbiased HSIC ignores a common offset; its sums cancel less without it
    K, L = X @ X.T, Y @ Y.T
    return hsic_unbiased(K, L) / torch.sqrt(hsic_unbiased(K, K) * hsic_unbiased(L, L))


def cka_matrix(states) -> torch.Tensor:
    """Unbiased linear CKA between every pair of ``states [m, n, d]`` (one batch of n tokens;
    a list of m ``[n, d]`` tensors works too).

    Each state is centred over its tokens first (unbiased HSIC does not change when one vector is added
    to every token, but its sums then cancel: a large common offset cost digits). All ``m`` Gram
    matrices are built once (each state cast to float64 alone, so the peak is
    the ``[m, n, n]`` Grams plus one ``[n, d]`` state); the ``m x m`` HSIC terms then come from one
    matrix product of the flattened, diagonal-free Grams: ``tr(K_i K_j) = <vec K_i, vec K_j>``.
    Returns ``[m, m]`` float64; entries are NaN where a state has zero variance.
    """
    m, n = len(states), states[0].shape[0]
    if n <= 3:
        raise ValueError(f"unbiased CKA needs more than 3 tokens per batch, got {n}")
    grams = torch.empty((m, n, n), dtype=F64, device=states[0].device)
    for i in range(m):  # one state in float64 at a time: the Grams are all that is kept
        x = states[i].to(F64)
        x = x - x.mean(0)  # centred: the same CKA (a common offset leaves unbiased HSIC unchanged), no cancellation
        torch.matmul(x, x.T, out=grams[i])
    del x
    grams.diagonal(dim1=1, dim2=2).zero_()
    flat = grams.reshape(m, n * n)
    trace = flat @ flat.T  # tr(K_i K_j)
    sums = flat.sum(1)  # 1^T K_i 1
    ones = grams.sum(2)  # K_i 1, [m, n]
    cross = ones @ ones.T  # 1^T K_i K_j 1
    hsic = (trace + torch.outer(sums, sums) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))
    self_hsic = torch.diagonal(hsic)
    return hsic / torch.sqrt(torch.outer(self_hsic, self_hsic))


@dataclass
class MSRS:
    """Model Structural Redundancy Score of an L x L similarity matrix."""

    total: float  # sum_{i<j} sigmoid(2 beta (S_ij - tau))
    per_pair: float | None  # total / (L (L - 1) / 2); None for one block (no pair)
    contributions: list[float]  # block i: sum_{j != i} sigmoid(2 beta (S_ij - tau))
    beta: float
    tau: float

    def to_dict(self) -> dict:
        return {"total": self.total, "per_pair": self.per_pair, "contributions": self.contributions,
                "beta": self.beta, "tau": self.tau}


def msrs(S: torch.Tensor, beta: float = 100.0, tau: float = 0.8) -> MSRS:
    """``MSRS = sum_{i<j} sigmoid(2 beta (S_ij - tau))`` (= ``0.5 (tanh(beta (S_ij - tau)) + 1)``).

    A soft count of block pairs more similar than ``tau``; NaN entries count as 0.
    """
    S = S.to(F64)
    L = S.shape[0]
    soft = torch.sigmoid(2.0 * beta * (S - tau)).nan_to_num(0.0)
    soft.fill_diagonal_(0.0)
    total = float(torch.triu(soft, diagonal=1).sum())
    pairs = L * (L - 1) / 2
    return MSRS(total, total / pairs if pairs else None, soft.sum(1).tolist(), float(beta), float(tau))


def msrs_text(m: dict, n_blocks: int, digits: int = 2) -> str:
    """``MSRS over P pairs (x per pair)`` of an MSRS record of ``n_blocks`` blocks; one block has no pair."""
    if m.get("per_pair") is None:
        return f"{m['total']:.{digits}f} (one block: no pair)"
    return f"{m['total']:.{digits}f} over {n_blocks * (n_blocks - 1) // 2:,} pairs ({m['per_pair']:.4f} per pair)"


class RunningMean:
    """Mean of a fixed-shape statistic over batches, NaN-aware: memory independent of batches.

    ``update(values, weight)`` adds ``weight * values`` where finite; entries that are not
    finite are skipped and counted in ``dropped`` (per entry).
    """

    def __init__(self, shape: tuple[int, ...], device: torch.device | str = "cpu"):
        self.sum = torch.zeros(shape, dtype=F64, device=device)
        self.weight = torch.zeros(shape, dtype=F64, device=device)
        self.dropped = torch.zeros(shape, dtype=torch.long, device=device)

    def update(self, values: torch.Tensor, weight: float = 1.0) -> None:
        values = values.to(self.sum)
        finite = torch.isfinite(values)
        self.sum += torch.where(finite, values, torch.zeros_like(values)) * weight
        self.weight += finite.to(F64) * weight
        self.dropped += (~finite).long()

    def add_sum(self, sums: torch.Tensor, weight: float) -> None:
        """Add a pre-summed statistic over ``weight`` samples (all finite)."""
        self.sum += sums.to(self.sum)
        self.weight += weight

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.weight  # NaN where nothing was counted
