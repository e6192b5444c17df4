"""Compiled FFT kernels for power-of-two lengths: complex FFT, real FFT and inverse FFT.

The complex transform of length M is a four-step FFT: M = N1 * N2, first N1 transforms
of length N2, then a multiplication by the twiddles exp(-2j*pi*j1*k2/M) fused with a
transposition, then N2 transforms of length N1. Each group runs as radix-4 Stockham
passes, plus one radix-2 pass for an odd power of two. The independent transforms of a
group are interleaved and real and imaginary parts are stored apart, so the inner loop
of every Stockham pass walks unit-stride float64 arrays and LLVM vectorises it. Only the
fused transposition runs scalar. Stockham passes write the output in natural order, so
there is no bit-reversal step. Lengths below
`_FOUR_STEP_MIN` skip the four-step split and run the passes on one transform.

The real FFT of length n packs the even and odd samples into one complex sequence of
length n/2, transforms it and separates the two half spectra. The inverse FFT uses
swap(fft(swap(a))) = n * ifft(a), where swap exchanges the real and imaginary parts
(swap(z) = j * conj(z)), so it runs the forward passes with the forward twiddles.

Every trigonometric value comes from `FftPlan`, computed once per length with numpy, so
a kernel call does no trigonometry. Kernels allocate their scratch per call (4 float64
arrays of the transform length), so threads may share one plan.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numba import njit

# "contract" lets LLVM fuse a multiply and an add into one FMA instruction (one rounding
# instead of two). It allows no reassociation and keeps IEEE NaN and infinity handling,
# unlike the full fastmath set.
_JIT = dict(cache=True, nogil=True, fastmath={"contract"})

# Shorter complex transforms run as a single Stockham sequence, without the four-step split.
_FOUR_STEP_MIN = 64

# Layout of the int64 table that `FftPlan.tables` pairs with the float64 twiddle array.
# A descriptor of 6 entries describes one complex transform length.
_LENGTH = 0            # complex transform length M
_N1 = 1                # number of column transforms, and the length of each row transform
_N2 = 2                # length of each column transform, and the number of row transforms
_COLUMN_TWIDDLES = 3   # offset of the pass twiddles for length N2
_ROW_TWIDDLES = 4      # offset of the pass twiddles for length N1
_CROSS_TWIDDLES = 5    # offset of exp(-2j*pi*j1*k2/M) at [k2 + N2*j1]: M real parts, then M imaginary
_DESCRIPTOR_SIZE = 6
# Kernels pass these as np.int64(...), so Numba compiles _four_step once, not per literal.
_HALF = 0              # descriptor of the length n/2 transform inside the real FFT
_FULL = _DESCRIPTOR_SIZE  # descriptor of the length n transform inside the inverse FFT
_SPLIT_TWIDDLES = 2 * _DESCRIPTOR_SIZE  # offset of exp(-2j*pi*k/n), k <= n/2: real parts, then imaginary
_LAYOUT_SIZE = 2 * _DESCRIPTOR_SIZE + 1

# Array indices below are uint64 on purpose: Numba adds a negative-index wraparound
# check to every signed index it cannot prove non-negative, and that check stops LLVM
# from vectorising the loop.
_U1 = np.uint64(1)
_U2 = np.uint64(2)
_U3 = np.uint64(3)


@njit(**_JIT)
def _radix4_butterflies(src_re, src_im, dst_re, dst_im, count, in0, in_step, out0, out_step,
                        w1r, w1i, w2r, w2i, w3r, w3i):
    """Apply `count` radix-4 butterflies that share one set of twiddles.

    Butterfly q reads src[in0 + j*in_step + q] for j = 0..3 and writes output r, multiplied
    by twiddle r (twiddle 0 is 1), to dst[out0 + r*out_step + q].
    """
    # Kept as its own function: inlined into the pass loop, LLVM no longer vectorises it.
    i0 = np.uint64(in0)
    i1 = i0 + np.uint64(in_step)
    i2 = i1 + np.uint64(in_step)
    i3 = i2 + np.uint64(in_step)
    o0 = np.uint64(out0)
    o1 = o0 + np.uint64(out_step)
    o2 = o1 + np.uint64(out_step)
    o3 = o2 + np.uint64(out_step)
    for q in range(np.uint64(count)):
        ar = src_re[i0 + q]
        ai = src_im[i0 + q]
        br = src_re[i1 + q]
        bi = src_im[i1 + q]
        cr = src_re[i2 + q]
        ci = src_im[i2 + q]
        dr = src_re[i3 + q]
        di = src_im[i3 + q]
        apc_r = ar + cr
        apc_i = ai + ci
        amc_r = ar - cr
        amc_i = ai - ci
        bpd_r = br + dr
        bpd_i = bi + di
        bmd_r = br - dr
        bmd_i = bi - di

        dst_re[o0 + q] = apc_r + bpd_r
        dst_im[o0 + q] = apc_i + bpd_i
        # Output 1 is (a - c) - j(b - d), output 3 is (a - c) + j(b - d).
        t_r = amc_r + bmd_i
        t_i = amc_i - bmd_r
        dst_re[o1 + q] = w1r * t_r - w1i * t_i
        dst_im[o1 + q] = w1r * t_i + w1i * t_r
        t_r = apc_r - bpd_r
        t_i = apc_i - bpd_i
        dst_re[o2 + q] = w2r * t_r - w2i * t_i
        dst_im[o2 + q] = w2r * t_i + w2i * t_r
        t_r = amc_r - bmd_i
        t_i = amc_i + bmd_r
        dst_re[o3 + q] = w3r * t_r - w3i * t_i
        dst_im[o3 + q] = w3r * t_i + w3i * t_r


@njit(**_JIT)
def _radix4_pass(src_re, src_im, dst_re, dst_im, length, stride, twiddles, offset):
    """Run one radix-4 Stockham pass over `stride` interleaved sequences of `length`.

    Element p of sequence q sits at [q + stride*p]. The pass writes output r of
    butterfly p at [q + stride*(4p + r)], multiplied by exp(-2j*pi*r*p/length).
    `twiddles[offset:]` contains those factors as 6 rows of length/4: the real and the
    imaginary parts for r = 1, 2 and 3.
    """
    quarter = length // 4
    block = stride * quarter
    for p in range(quarter):
        _radix4_butterflies(
            src_re, src_im, dst_re, dst_im, stride, stride * p, block, 4 * stride * p, stride,
            twiddles[offset + p], twiddles[offset + quarter + p],
            twiddles[offset + 2 * quarter + p], twiddles[offset + 3 * quarter + p],
            twiddles[offset + 4 * quarter + p], twiddles[offset + 5 * quarter + p],
        )


@njit(**_JIT)
def _radix2_pass(src_re, src_im, dst_re, dst_im, stride):
    """Run the last radix-2 pass (length 2, no twiddles) over `stride` interleaved sequences."""
    s = np.uint64(stride)
    for q in range(s):
        ar = src_re[q]
        ai = src_im[q]
        br = src_re[s + q]
        bi = src_im[s + q]
        dst_re[q] = ar + br
        dst_im[q] = ai + bi
        dst_re[s + q] = ar - br
        dst_im[s + q] = ai - bi


@njit(**_JIT)
def _stockham(a_re, a_im, b_re, b_im, length, stride, twiddles, offset, passes):
    """Run the first `passes` passes of `stride` interleaved transforms of `length`.

    Radix-4 passes come first and one radix-2 pass ends an odd power of two. The data
    moves between buffer a and buffer b on each pass. Returns True when the result is
    in b.
    """
    in_b = False
    done = 0
    while length >= 4 and done < passes:
        if in_b:
            _radix4_pass(b_re, b_im, a_re, a_im, length, stride, twiddles, offset)
        else:
            _radix4_pass(a_re, a_im, b_re, b_im, length, stride, twiddles, offset)
        in_b = not in_b
        offset += 6 * (length // 4)
        stride *= 4
        length //= 4
        done += 1
    if length == 2 and done < passes:
        if in_b:
            _radix2_pass(b_re, b_im, a_re, a_im, stride)
        else:
            _radix2_pass(a_re, a_im, b_re, b_im, stride)
        in_b = not in_b
    return in_b


@njit(**_JIT)
def _column_passes(n2):
    """Return how many radix-4 passes come before the last column pass, and that pass's radix."""
    passes = 0
    length = n2
    while length > 4:
        length //= 4
        passes += 1
    return passes, length


@njit(**_JIT)
def _store_cross(dst_re, dst_im, twiddles, cross_re, cross_im, k, t_r, t_i):
    """Store (t_r + j*t_i) * cross twiddle k at dst[k]."""
    w_r = twiddles[cross_re + k]
    w_i = twiddles[cross_im + k]
    dst_re[k] = w_r * t_r - w_i * t_i
    dst_im[k] = w_r * t_i + w_i * t_r


@njit(**_JIT)
def _last_column_pass(src_re, src_im, dst_re, dst_im, n1, n2, radix, twiddles, cross):
    """Run the last column pass, multiply by the cross twiddles and transpose.

    The last pass has radix 2 or 4 and no twiddles of its own. Its input j of butterfly
    (j1, c) sits at [j1 + n1*c + (m/radix)*j], and output r is element k2 = c + (n2/radix)*r
    of column j1. That element goes to [k2 + n2*j1], the layout of the row transforms.
    """
    m = n1 * n2
    part = np.uint64(m // radix)
    rows = np.uint64(n2 // radix)
    n1u = np.uint64(n1)
    n2u = np.uint64(n2)
    cross_re = np.uint64(cross)
    cross_im = cross_re + np.uint64(m)
    # The loads stride by n1, so LLVM does not vectorise this pass. A transposition has
    # to be strided on one side: strided loads measured 2.3 us at n = 4096, strided stores 2.5 us.
    for j1 in range(n1u):
        base = n2u * j1
        for c in range(rows):
            i0 = j1 + n1u * c
            k = base + c
            ar = src_re[i0]
            ai = src_im[i0]
            br = src_re[i0 + part]
            bi = src_im[i0 + part]
            if radix == 2:
                _store_cross(dst_re, dst_im, twiddles, cross_re, cross_im, k, ar + br, ai + bi)
                _store_cross(dst_re, dst_im, twiddles, cross_re, cross_im, k + rows, ar - br, ai - bi)
                continue

            cr = src_re[i0 + _U2 * part]
            ci = src_im[i0 + _U2 * part]
            dr = src_re[i0 + _U3 * part]
            di = src_im[i0 + _U3 * part]
            apc_r = ar + cr
            apc_i = ai + ci
            amc_r = ar - cr
            amc_i = ai - ci
            bpd_r = br + dr
            bpd_i = bi + di
            bmd_r = br - dr
            bmd_i = bi - di
            _store_cross(dst_re, dst_im, twiddles, cross_re, cross_im, k,
                         apc_r + bpd_r, apc_i + bpd_i)
            _store_cross(dst_re, dst_im, twiddles, cross_re, cross_im, k + rows,
                         amc_r + bmd_i, amc_i - bmd_r)
            _store_cross(dst_re, dst_im, twiddles, cross_re, cross_im, k + _U2 * rows,
                         apc_r - bpd_r, apc_i - bpd_i)
            _store_cross(dst_re, dst_im, twiddles, cross_re, cross_im, k + _U3 * rows,
                         amc_r - bmd_i, amc_i + bmd_r)


@njit(**_JIT)
def _four_step(a_re, a_im, b_re, b_im, twiddles, layout, descriptor):
    """Transform (a_re, a_im) forward, unnormalised, with b as scratch of the same length.

    `descriptor` selects the transform length in `layout`. Returns the pair of arrays
    that contains the result, real parts first.
    """
    m = layout[descriptor + _LENGTH]
    n1 = layout[descriptor + _N1]
    n2 = layout[descriptor + _N2]
    column_twiddles = layout[descriptor + _COLUMN_TWIDDLES]
    if n1 == 1:
        # One transform of length m: with n1 = 1 the column passes are the whole FFT.
        if _stockham(a_re, a_im, b_re, b_im, m, n1, twiddles, column_twiddles, m):
            return b_re, b_im
        return a_re, a_im

    # Column transforms: n1 interleaved transforms of length n2.
    passes, last = _column_passes(n2)
    if _stockham(a_re, a_im, b_re, b_im, n2, n1, twiddles, column_twiddles, passes):
        a_re, b_re = b_re, a_re
        a_im, b_im = b_im, a_im
    _last_column_pass(a_re, a_im, b_re, b_im, n1, n2, last, twiddles,
                      layout[descriptor + _CROSS_TWIDDLES])

    # Row transforms: n2 interleaved transforms of length n1, a power of 4.
    if _stockham(b_re, b_im, a_re, a_im, n1, n2, twiddles, layout[descriptor + _ROW_TWIDDLES], n1):
        return a_re, a_im
    return b_re, b_im


@njit(**_JIT)
def _scratch(length):
    """Allocate four float64 arrays of `length`, each starting on a 64-byte boundary.

    Numba aligns new arrays to 32 bytes only, and a 64-byte AVX-512 load from such an
    address spans two cache lines; alignment saved about 5 % at n >= 16384 on x86-64.
    """
    raw = np.empty(4 * length + 8)
    skip = (64 - raw.ctypes.data % 64) % 64 // 8
    return (raw[skip:skip + length], raw[skip + length:skip + 2 * length],
            raw[skip + 2 * length:skip + 3 * length], raw[skip + 3 * length:skip + 4 * length])


@njit(**_JIT)
def _rfft(x, tables, out):
    """Write numpy.fft.rfft(x) into `out`: the unscaled one-sided spectrum, exp(-2j*pi*k*t/n) kernel.

    `x` is contiguous float64 of length n, a power of two >= 4; `out` is contiguous
    complex128 of length n/2 + 1; `tables` is `fft_plan(n).tables`. Nothing is checked.
    A NaN or infinity in `x` propagates into every bin of `out` (checked by
    tests/test_fft.py for a few lengths). Callers that need finite input check it first
    with `_all_finite`.
    """
    twiddles, layout = tables
    n = x.size
    m = n // 2
    mu = np.uint64(m)
    a_re, a_im, b_re, b_im = _scratch(m)
    for i in range(mu):
        a_re[i] = x[_U2 * i]
        a_im[i] = x[_U2 * i + _U1]
    z_re, z_im = _four_step(a_re, a_im, b_re, b_im, twiddles, layout, np.int64(_HALF))

    # With Z the transform of z[t] = x[2t] + j*x[2t+1]: E[k] = (Z[k] + conj(Z[m-k]))/2 is
    # the spectrum of the even samples, O[k] = (Z[k] - conj(Z[m-k]))/(2j) that of the odd
    # samples, and X[k] = E[k] + exp(-2j*pi*k/n) * O[k].
    out[0] = complex(z_re[0] + z_im[0], 0.0)
    out[m] = complex(z_re[0] - z_im[0], 0.0)
    flat = out.view(np.float64)
    w_re = np.uint64(layout[_SPLIT_TWIDDLES])
    w_im = w_re + mu + _U1
    for k in range(_U1, mu):
        j = mu - k
        pr = z_re[k]
        pi = z_im[k]
        qr = z_re[j]
        qi = z_im[j]
        e_r = 0.5 * (pr + qr)
        e_i = 0.5 * (pi - qi)
        o_r = 0.5 * (pi + qi)
        o_i = 0.5 * (qr - pr)
        c = twiddles[w_re + k]
        s = twiddles[w_im + k]
        flat[_U2 * k] = e_r + c * o_r - s * o_i
        flat[_U2 * k + _U1] = e_i + c * o_i + s * o_r


@njit(**_JIT)
def _ifft_inplace(a, tables):
    """Replace `a` by numpy.fft.ifft(a), normalised by 1/n.

    `a` is contiguous complex128 of length n, a power of two >= 4; `tables` is
    `fft_plan(n).tables`. Nothing is checked.
    """
    twiddles, layout = tables
    n = a.size
    nu = np.uint64(n)
    a_re, a_im, b_re, b_im = _scratch(n)
    flat = a.view(np.float64)
    # ifft(a) = swap(fft(swap(a))) / n, where swap exchanges real and imaginary parts.
    for i in range(nu):
        a_re[i] = flat[_U2 * i + _U1]
        a_im[i] = flat[_U2 * i]
    z_re, z_im = _four_step(a_re, a_im, b_re, b_im, twiddles, layout, np.int64(_FULL))
    scale = 1.0 / n
    for i in range(nu):
        flat[_U2 * i] = z_im[i] * scale
        flat[_U2 * i + _U1] = z_re[i] * scale


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def _all_finite(x):
    """Return True when every value of float64 `x` is finite.

    About 8 times faster than np.all(np.isfinite(x)) at n = 4096, because it
    allocates no boolean array. x - x is 0.0 for a finite value and NaN for NaN or
    infinity, and a sum of such terms is NaN whatever its order, so "reassoc" (which
    lets LLVM vectorise the sum) cannot change the result.
    """
    total = 0.0
    for i in range(x.size):
        total += x[i] - x[i]
    return total == 0.0


def _split_length(m: int) -> tuple[int, int]:
    """Return (N1, N2) with N1 * N2 = m for the four-step transform; N1 is 1 below
    `_FOUR_STEP_MIN`.

    N1 is a power of 4, so the row transforms need no radix-2 pass. N1 = 16 was the
    fastest split for every m from 512 to 32768 on an AVX-512 x86-64 machine (rfft
    timings, `_split_length` patched per run); larger N1 made the scalar transposition
    slower than the short column loops it saves. Not measured on aarch64.
    """
    if m < _FOUR_STEP_MIN:
        return 1, m
    n1 = 16 if m >= 256 else 4
    return n1, m // n1


def _pass_twiddles(length: int) -> list[np.ndarray]:
    """Return the twiddle rows of every radix-4 pass of a transform of `length`, in pass order."""
    rows = []
    while length >= 4:
        p = np.arange(length // 4)
        for r in (1, 2, 3):
            w = np.exp(-2j * np.pi * (r * p) / length)
            rows.append(w.real)
            rows.append(w.imag)
        length //= 4
    return rows


class _TableBuilder:
    """Accumulate float64 twiddle rows and hand out their offsets."""

    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []
        self.size = 0

    def add(self, rows: list[np.ndarray]) -> int:
        offset = self.size
        for row in rows:
            self.rows.append(np.asarray(row, dtype=np.float64))
            self.size += row.size
        return offset

    def add_complex_length(self, m: int, layout: np.ndarray, descriptor: int) -> None:
        n1, n2 = _split_length(m)
        layout[descriptor + _LENGTH] = m
        layout[descriptor + _N1] = n1
        layout[descriptor + _N2] = n2
        layout[descriptor + _COLUMN_TWIDDLES] = self.add(_pass_twiddles(n2))
        layout[descriptor + _ROW_TWIDDLES] = self.add(_pass_twiddles(n1))
        # Reduce j1*k2 modulo m before scaling, so the angle stays exact for large m.
        j1 = np.arange(n1)[:, None]
        k2 = np.arange(n2)[None, :]
        cross = np.exp(-2j * np.pi * ((j1 * k2) % m) / m).ravel()
        layout[descriptor + _CROSS_TWIDDLES] = self.add([cross.real, cross.imag])


class FftPlan:
    """Precomputed tables for transforms of one power-of-two length `n`.

    `tables` is the tuple that `_rfft(x, tables, out)` and `_ifft_inplace(a, tables)`
    take: a float64 array of every twiddle factor and an int64 array of offsets into it
    (the `_LENGTH` .. `_SPLIT_TWIDDLES` layout). They cover the complex transform of
    length n/2 inside the real FFT, the complex transform of length n inside the inverse
    FFT, and the twiddles that split the real FFT's half spectra: about 4.3n float64
    values, 0.27 MiB at n = 8192. The arrays are read-only.
    """

    __slots__ = ("n", "twiddles", "layout", "tables")

    def __init__(self, n: int) -> None:
        if not isinstance(n, (int, np.integer)) or n < 4 or n & (n - 1):
            raise ValueError(
                f"FFT length {n!r} is not supported; use a power of two of at least 4 "
                "(for example 1024, 4096 or 16384)"
            )
        n = int(n)
        self.n = n
        builder = _TableBuilder()
        layout = np.zeros(_LAYOUT_SIZE, dtype=np.int64)
        builder.add_complex_length(n // 2, layout, _HALF)
        builder.add_complex_length(n, layout, _FULL)
        k = np.arange(n // 2 + 1)
        split = np.exp(-2j * np.pi * k / n)
        layout[_SPLIT_TWIDDLES] = builder.add([split.real, split.imag])

        self.twiddles = np.concatenate(builder.rows)
        self.layout = layout
        self.twiddles.flags.writeable = False
        self.layout.flags.writeable = False
        self.tables = (self.twiddles, self.layout)


@lru_cache(maxsize=16)
def fft_plan(n: int) -> FftPlan:
    """Return the cached plan for length `n`."""
    return FftPlan(n)


@njit(cache=True, nogil=True)
def _rfft_checked(x, tables):
    """Return rfft(x), or an empty array when x contains NaN or infinity.

    One compiled call for the public wrapper: the finiteness check, the output allocation
    and the transform, so the wrapper pays one dispatch instead of three.
    """
    if not _all_finite(x):
        return np.empty(0, dtype=np.complex128)
    out = np.empty(x.size // 2 + 1, dtype=np.complex128)
    _rfft(x, tables, out)
    return out
