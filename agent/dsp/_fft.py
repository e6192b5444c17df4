"""Compiled FFT kernels: iterative radix-2 complex FFT and the half-length real FFT.

Twiddle factors and the bit-reversal permutation are computed once per length by
`FftPlan` and passed into the kernels, so a kernel call does no trigonometry.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numba import njit

_JIT = dict(cache=True, nogil=True)


@njit(**_JIT)
def _bit_reverse_permute(a, bitrev):
    for i in range(a.size):
        j = bitrev[i]
        if j > i:
            tmp = a[i]
            a[i] = a[j]
            a[j] = tmp


@njit(**_JIT)
def _fft_inplace(a, twiddles, bitrev, stride):
    """Transform `a` in place (forward, unnormalised).

    `twiddles[k * stride]` must be exp(-2j*pi*k/n) for n = a.size, k < n/2.
    """
    n = a.size
    _bit_reverse_permute(a, bitrev)

    # Butterflies of length 2, 4, ..., n. The twiddle step halves as the length doubles.
    size = 2
    while size <= n:
        half = size // 2
        step = (n // size) * stride
        for start in range(0, n, size):
            for k in range(half):
                w = twiddles[k * step]
                i = start + k
                j = i + half
                t = w * a[j]
                a[j] = a[i] - t
                a[i] = a[i] + t
        size *= 2


@njit(**_JIT)
def _rfft(x, tables, out):
    """Write the one-sided spectrum of real `x` (length n) into `out` (length n/2 + 1).

    Packs the even and odd samples into one complex sequence of length n/2, transforms
    it, and separates the two half spectra with the length-n twiddles.
    """
    twiddles, bitrev, bitrev_half = tables
    n = x.size
    m = n // 2
    z = np.empty(m, dtype=np.complex128)
    for i in range(m):
        z[i] = complex(x[2 * i], x[2 * i + 1])
    _fft_inplace(z, twiddles, bitrev_half, 2)

    out[0] = complex(z[0].real + z[0].imag, 0.0)
    out[m] = complex(z[0].real - z[0].imag, 0.0)
    for k in range(1, m):
        zk = z[k]
        zc = z[m - k].conjugate()
        even = 0.5 * (zk + zc)
        odd = -0.5j * (zk - zc)
        out[k] = even + twiddles[k] * odd


@njit(**_JIT)
def _ifft_inplace(a, tables):
    """Inverse transform of complex `a` (length n) in place, normalised by 1/n."""
    twiddles, bitrev, bitrev_half = tables
    n = a.size
    for i in range(n):
        a[i] = a[i].conjugate()
    _fft_inplace(a, twiddles, bitrev, 1)
    scale = 1.0 / n
    for i in range(n):
        a[i] = a[i].conjugate() * scale


def _bit_reversal(n: int) -> np.ndarray:
    bits = n.bit_length() - 1
    idx = np.arange(n, dtype=np.int64)
    rev = np.zeros(n, dtype=np.int64)
    for b in range(bits):
        rev |= ((idx >> b) & 1) << (bits - 1 - b)
    return rev


class FftPlan:
    """Precomputed tables for transforms of one power-of-two length `n`.

    Holds the twiddles of length n (used with stride 2 for the half-length transform
    inside the real FFT) and the bit-reversal tables of lengths n and n/2.
    """

    __slots__ = ("n", "twiddles", "bitrev", "bitrev_half", "tables")

    def __init__(self, n: int) -> None:
        if n < 4 or n & (n - 1):
            raise ValueError(
                f"FFT length {n} is not supported; use a power of two of at least 4 "
                "(for example 1024, 4096 or 16384)"
            )
        self.n = n
        k = np.arange(n // 2)
        self.twiddles = np.exp(-2j * math.pi * k / n).astype(np.complex128)
        self.bitrev = _bit_reversal(n)
        self.bitrev_half = _bit_reversal(n // 2)
        # The tuple the kernels take: `_rfft(x, tables, out)` and `_ifft_inplace(a, tables)`.
        self.tables = (self.twiddles, self.bitrev, self.bitrev_half)


@lru_cache(maxsize=16)
def fft_plan(n: int) -> FftPlan:
    """Return the cached plan for length `n`."""
    return FftPlan(n)
