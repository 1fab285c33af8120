"""Hadamard matrices of order K * 2**p and the fast (randomized) Hadamard transform.

QuIP# (Tseng, Chee, Sun, Kuleshov, De Sa 2024, "QuIP#: Even Better LLM
Quantization with Hadamard Incoherence and Lattice Codebooks", §3) makes a
weight incoherent by multiplying it on both sides by a random orthogonal
matrix H · diag(s): a Hadamard matrix H (entries ±1, H Hᵀ = n I) scaled by
1/sqrt(n), times random signs s. A dimension n that is not a power of two is
written n = K * 2**p with a small Hadamard order K, and H = H_K ⊗ H_{2**p}
(Kronecker product), so x Hᵀ costs a dense K×K product plus a Walsh–Hadamard
butterfly of size 2**p: O(n (K + p)) per vector instead of O(n²).

Constructions (all built in code; none is typed in):

- Sylvester: H_1 = [1], H_{2m} = [[H_m, H_m], [H_m, -H_m]] (symmetric).
- Paley I (q ≡ 3 mod 4, order q + 1): with χ the quadratic character
  of GF(q) and the Jacobsthal matrix Q[i, j] = χ(j - i) (skew-symmetric),
  H = I + [[0, 1ᵀ], [-1, Q]].
- Paley II (q ≡ 1 mod 4, order 2(q + 1)): with the symmetric
  conference matrix C = [[0, 1ᵀ], [1, Q]], H = C ⊗ [[1, 1], [1, -1]] +
  I ⊗ [[1, -1], [-1, -1]].

q is a prime, or, for an order no prime gives, a prime power p**d with d <= 3
(GF(p**d) as polynomials over GF(p) modulo the first monic irreducible
polynomial of degree d in lexicographic order; element index = its
coefficients as base-p digits): Llama-2-7B's FFN width 11008 = 43 * 256
takes K = 344 = 343 + 1 from GF(7**3), not the dense 5504 = 5503 + 1. Prime
fields come first, so every order a prime builds keeps its matrix (28 is
Paley II of 13, not Paley I of 27).

The K used for n is the smallest K = m * 2**j (m = the odd part of n, j ≥ 0,
K dividing n) that one of these builds: K = 1 for powers of two, 12 (Paley I,
q = 11) for 3 * 2**p, 20 (Paley I, q = 19) for 5 * 2**p, 28 (Paley II,
q = 13) for 7 * 2**p, 36 (Paley II, q = 17) for 9 * 2**p, 344 (Paley I,
q = 7**3) for 43 * 2**p, and so on.

Convention: `fast_hadamard(x)` returns x Hᵀ / sqrt(n) over the last axis,
i.e. H v / sqrt(n) for every row vector v; `fast_hadamard(x, transpose=True)`
returns x H / sqrt(n) = Hᵀ v / sqrt(n). The two are inverses of each other
(H / sqrt(n) is orthogonal). The Sylvester factor is symmetric; Paley factors
are not, so the two differ when K > 2.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from runtime.device import array_module_of
from runtime.errors import UserError


MAX_FIELD_DEGREE = 3  # GF(p**d) for d up to this (an irreducible polynomial is one without roots)


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, d) with q = p**d, p prime and d <= MAX_FIELD_DEGREE, else None."""
    for d in range(1, MAX_FIELD_DEGREE + 1):
        p = round(q ** (1 / d))
        if p ** d == q and _is_prime(p):
            return p, d
    return None


def _paley_kind(k: int) -> str | None:
    """"I" or "II" when a Paley construction gives order k (> 2), else None: over a prime field first (I, then
    II), then over a prime-power field."""
    if k % 4:
        return None
    for field in (_is_prime, _prime_power):
        if field(k - 1) and (k - 1) % 4 == 3:
            return "I"
        if field(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
            return "II"
    return None


def hadamard_factor(n: int) -> tuple[int, int]:
    """(K, p) with n = K * 2**p and K the smallest order built here (1, or a Paley order).

    UserError when no K = (odd part of n) * 2**j dividing n has a construction.
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise UserError(f"Hadamard transform: size must be a positive integer, got {n!r}")
    n = int(n)
    power = n & -n  # largest power of two dividing n
    odd = n // power
    k = odd
    while n % k == 0:
        if k == 1 or _paley_kind(k):
            return k, (n // k).bit_length() - 1
        k *= 2
    raise UserError(f"Hadamard transform: no construction for size {n} = {odd} * {power}; supported sizes "
                    f"are K * 2**p with K = 1 or a Paley order (q + 1 for a prime q ≡ 3 mod 4, 2(q + 1) for "
                    f"a prime q ≡ 1 mod 4), e.g. 12, 20, 28, 36 times a power of two")


def _sylvester(size: int) -> np.ndarray:
    """Sylvester Hadamard matrix [size, size] (size a power of two), float32 ±1."""
    h = np.ones((1, 1), dtype=np.float32)
    while h.shape[0] < size:
        h = np.block([[h, h], [h, -h]])
    return h


def _field_product(a: np.ndarray, b: np.ndarray, p: int, modulus: tuple) -> np.ndarray:
    """a * b in GF(p**d) for coefficient vectors a, b [..., d] (lowest degree first) modulo the monic polynomial
    x**d + modulus[d-1] x**(d-1) + ... + modulus[0]."""
    d = len(modulus)
    full = np.zeros(a.shape[:-1] + (2 * d - 1,), dtype=np.int64)  # [..., 2d-1] the product before reduction
    for i in range(d):
        for j in range(d):
            full[..., i + j] += a[..., i] * b[..., j]
    for top in range(2 * d - 2, d - 1, -1):  # x**top = -(modulus) x**(top-d)
        for i in range(d):
            full[..., top - d + i] -= full[..., top] * modulus[i]
    return full[..., :d] % p


def _irreducible(p: int, d: int) -> tuple:
    """The coefficients (lowest first, the leading 1 left out) of the first monic polynomial of degree d over GF(p)
    without roots in GF(p), in lexicographic order of (c_0, ..., c_{d-1}): irreducible, for d <= 3."""
    values = np.arange(p)
    for index in range(p ** d):
        coefficients = tuple(index // p ** i % p for i in range(d))
        if all((v ** d + sum(c * v ** i for i, c in enumerate(coefficients))) % p for v in values):
            return coefficients
    raise ValueError(f"no irreducible polynomial of degree {d} over GF({p})")


def _jacobsthal(q: int) -> np.ndarray:
    """Q [q, q] int with Q[i, j] = χ(x_j - x_i), χ the quadratic character of GF(q) (q = p**d; element i has the
    base-p digits of i as its coefficients: for a prime, x_i = i)."""
    p, d = _prime_power(q)
    digits = np.arange(q)[:, None] // p ** np.arange(d)[None, :] % p  # [q, d] coefficients of each element
    weights = p ** np.arange(d)  # [d]
    if d == 1:
        squares = np.unique(np.arange(1, q) ** 2 % q)
    else:
        squares = np.unique(_field_product(digits[1:], digits[1:], p, _irreducible(p, d)) @ weights)
    chi = np.full(q, -1, dtype=np.int64)  # [q]
    chi[0], chi[squares] = 0, 1
    difference = (digits[None, :, :] - digits[:, None, :]) % p @ weights  # [q, q] index of x_j - x_i
    return chi[difference]  # [q, q]


@functools.lru_cache(maxsize=None)
def _small_hadamard(k: int) -> np.ndarray:
    """The K×K factor (float32 ±1, read-only): [1] for K = 1, else a Paley matrix."""
    if k == 1:
        h = np.ones((1, 1), dtype=np.float32)
    elif _paley_kind(k) == "I":
        q = k - 1
        core = np.zeros((k, k), dtype=np.int64)  # [k, k] skew conference matrix
        core[0, 1:] = 1
        core[1:, 0] = -1
        core[1:, 1:] = _jacobsthal(q)
        h = (np.eye(k, dtype=np.int64) + core).astype(np.float32)
    elif _paley_kind(k) == "II":
        q = k // 2 - 1
        conf = np.zeros((q + 1, q + 1), dtype=np.int64)  # [q+1, q+1] symmetric conference matrix
        conf[0, 1:] = 1
        conf[1:, 0] = 1
        conf[1:, 1:] = _jacobsthal(q)
        h = (np.kron(conf, [[1, 1], [1, -1]]) + np.kron(np.eye(q + 1, dtype=np.int64), [[1, -1], [-1, -1]]))
        h = h.astype(np.float32)
    else:
        raise UserError(f"Hadamard transform: no construction for order {k}")
    h.setflags(write=False)
    return h


def small_hadamard(k: int) -> np.ndarray:
    """The unnormalized K×K Hadamard factor used for sizes K * 2**p (read-only, float32 ±1)."""
    return _small_hadamard(int(k))


def hadamard_matrix(n: int) -> np.ndarray:
    """H [n, n] float32 with entries ±1 and H Hᵀ = n I: small_hadamard(K) ⊗ Sylvester(2**p)."""
    k, p = hadamard_factor(n)
    return np.kron(small_hadamard(k), _sylvester(1 << p)).astype(np.float32)  # [n, n]


def fast_hadamard(x, normalize: bool = True, transpose: bool = False):
    """x [..., n] (NumPy or CuPy, float32) -> x Hᵀ / sqrt(n) (transpose=False) or x H / sqrt(n) (True).

    The Walsh–Hadamard butterfly runs on the 2**p axis, the dense K×K factor
    on the K axis (index i of the last axis = a * 2**p + b, a < K, b < 2**p).
    Without `normalize` the 1/sqrt(n) factor is left out.
    """
    xp = array_module_of(x)
    n = x.shape[-1]
    k, p = hadamard_factor(n)
    size = 1 << p
    lead = x.shape[:-1]
    y = xp.asarray(x, dtype=xp.float32).reshape(-1, k, size)  # [rows, K, 2**p]
    rows = y.shape[0]
    half = 1
    while half < size:
        pairs = y.reshape(rows, k, size // (2 * half), 2, half)  # [rows, K, blocks, 2, half]
        top, bottom = pairs[:, :, :, 0], pairs[:, :, :, 1]  # [rows, K, blocks, half]
        y = xp.stack([top + bottom, top - bottom], axis=3).reshape(rows, k, size)  # [rows, K, 2**p]
        half *= 2
    if k > 1:
        h_k = xp.asarray(small_hadamard(k))  # [K, K]
        y = xp.matmul(h_k.T if transpose else h_k, y)  # [rows, K, 2**p]
    if normalize:
        y = y * (1.0 / math.sqrt(n))
    return y.reshape(*lead, n)


def _factors(n: int, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H_K, Sylvester(2**a), Sylvester(2**b) / sqrt(n)) of `dtype`, a + b = p: H / sqrt(n) = H_K ⊗ S_a ⊗ S_b /
    sqrt(n), Sylvester(2**p) being the Kronecker power of [[1, 1], [1, -1]] (S_a, S_b symmetric)."""
    k, p = hadamard_factor(n)
    return (small_hadamard(k).astype(dtype), _sylvester(1 << (p // 2)).astype(dtype),
            _sylvester(1 << (p - p // 2)).astype(dtype) / math.sqrt(n))


def hadamard_on_columns(x: np.ndarray, transpose: bool = False) -> np.ndarray:
    """x [n, m] (NumPy, float32 or float64) -> H x / sqrt(n) (or Hᵀ x / sqrt(n) with `transpose`) in x's
    precision, one small dense factor at a time (`_factors`), each a left product over the first axis: O(m (K +
    2**a + 2**b)) per column by BLAS, for quantization's transforms (`fast_hadamard` computes in float32, for
    run time). OPT-1.3b's fc2 Hessian, [8192, 8192]: a dense n×n product took 12 s."""
    x = np.asarray(x)
    dtype = np.result_type(x.dtype, np.float32)
    h_k, s_a, s_b = _factors(x.shape[0], dtype)
    k, A, B = h_k.shape[0], s_a.shape[0], s_b.shape[0]
    y = x.astype(dtype, copy=False)  # [n, m]
    if k > 1:
        y = (h_k.T if transpose else h_k) @ y.reshape(k, -1)  # [K, A*B*m] over k
    y = s_a @ y.reshape(k, A, -1)  # [K, A, B*m] over a
    y = s_b @ y.reshape(k * A, B, -1)  # [K*A, B, m] over b
    return y.reshape(x.shape)


def random_signs(n: int, seed: int) -> np.ndarray:
    """[n] float32 of independent uniform ±1 from a NumPy Generator seeded with `seed`."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 2, size=n) * 2 - 1).astype(np.float32)  # [n]
