"""The Triton code of the ``a8-triton`` kernel (:mod:`.a8triton` launches it): :mod:`sensimix.a8`'s arithmetic as
Triton operations, each chosen to round exactly as the torch definition does.

How each rule of :mod:`sensimix.a8` is kept, on a GPU and in Triton's CPU interpreter alike:

* no FMA: every launch passes ``enable_fp_fusion=False`` (LLVM would otherwise contract ``a * b + c``), and
  ``enable_reflect_ftz=False`` (libdevice's floor would flush subnormals: ``cvt.rmi.ftz``); the interpreter never
  fuses nor flushes (numpy), so it cannot catch a forgotten flag: :mod:`.a8triton` launches through one helper that
  always passes both, and unit/test_triton_a8.py compiles the kernels to PTX (no GPU needed) and finds no ``fma``
  and no ``.ftz`` there;
* divisions by ``tl.math.div_rn`` (``div.rn.f32``; Triton's ``/`` on fp32 is ``div.full.f32``, ~2 ulp), the square
  root by ``tl.math.sqrt_rn`` (``sqrt.rn.f32``) of the fp32 value: the correctly rounded fp32 root, which is what
  :func:`sensimix.a8.layer_norm` takes (an fp64 root rounded once to fp32 is the correctly rounded fp32 root for
  every fp32 input);
* ``rint`` (half to even) as ``(v + 1.5 * 2^23) - 1.5 * 2^23`` for |v| <= 2^22 (every value rounded here is within
  [-256, 256]): one fp32 addition rounds to an integer, the subtraction is exact; libdevice's ``rint`` has no
  interpreter twin, this has the same bits on both;
* the LayerNorm's moments as fp64 sums (``x.to(tl.float64)``), divided by n in fp64 and rounded once to fp32;
* exact integer products: ``tl.dot`` of int8 operands accumulating in int32 (tensor cores on sm_80+; numpy's
  integer matmul in the interpreter), the rows shifted to [-128, 127] and the shift folded back with the weight's
  column sums: ``(q - zero) . Q = (q - 128) . Q + (128 - zero) * colsum(Q)``, all in int32 (exact for K < 2^16).

Plain fp32 additions and multiplications keep IEEE subnormals on NVIDIA GPUs (Triton sets no denormal mode for them),
so a GPU rounds every operation here as numpy and torch's CPU kernels do.
"""

from __future__ import annotations

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

from .. import a8

ACT_NONE, ACT_GELU, ACT_RELU = 0, 1, 2
PARTS = 3  # per row and output tile, the GEMM's range epilogue writes [lo, hi, non-finite count]

if triton is not None:
    # sensimix.a8's constants as Triton compile-time values (rounded to fp32 to nearest where an fp32 operation
    # takes them, as torch.tensor(value, dtype=torch.float32) does)
    _ROUNDER: tl.constexpr = tl.constexpr(12582912.0)  # 1.5 * 2^23: (v + it) - it is rint(v) for |v| <= 2^22
    _LEVELS: tl.constexpr = tl.constexpr(float(a8.LEVELS))
    _TINY: tl.constexpr = tl.constexpr(a8.TINY_RANGE)
    _P: tl.constexpr = tl.constexpr(a8._P)
    _SQRT_HALF: tl.constexpr = tl.constexpr(a8._SQRT_HALF)
    _Z_MAX: tl.constexpr = tl.constexpr(a8._Z_MAX)
    _A0, _A1, _A2, _A3, _A4 = (tl.constexpr(a) for a in a8._A)
    _LOG2E: tl.constexpr = tl.constexpr(a8._LOG2E)
    _C1: tl.constexpr = tl.constexpr(a8._C1)
    _C2: tl.constexpr = tl.constexpr(a8._C2)
    _E0, _E1, _E2, _E3, _E4, _E5 = (tl.constexpr(e) for e in a8._E)

    @triton.jit
    def _rint(v):
        return (v + _ROUNDER) - _ROUNDER

    @triton.jit
    def _finite(v):
        return (v == v) & (tl.abs(v) != float("inf"))  # noqa: PLR0124 - v == v is False for NaN

    @triton.jit
    def _row_rule(lo, hi, bad):
        """The A8 rule's per-row numbers from a row's lo = min(0, min x), hi = max(0, max x) (over its finite
        values) and its count of non-finite values: (live, inv, zero as fp32, scale)."""
        d = hi - lo
        fine = (bad == 0) & _finite(d)
        live = fine & (d >= _TINY)
        inv = tl.where(live, tl.math.div_rn(_LEVELS, tl.where(live, d, 1.0)), 0.0)
        zero = tl.minimum(tl.maximum(_rint(-lo * inv), 0.0), _LEVELS)
        zero = tl.where(live, zero, 0.0)
        scale = tl.where(live, tl.math.div_rn(d, _LEVELS), tl.where(fine, 0.0, float("nan")))
        return live, inv, zero, scale

    @triton.jit
    def _quantize_values(x, inv, zero, live):
        """q_j = clamp(rint(x_j * inv) + zero, 0, 255) as int32 (0 for a row that is not live)."""
        q = tl.minimum(tl.maximum(_rint(x * inv) + zero, 0.0), _LEVELS)
        return tl.where(live, q, 0.0).to(tl.int32)

    @triton.jit
    def _pow2(n):
        return ((n.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _exp_neg(y):
        """sensimix.a8.exp_neg: exp(y) for y in [-81, 0], Cephes' expf as a fixed sequence of fp32 operations."""
        n = tl.floor(y * _LOG2E + 0.5)
        r = (y - n * _C1) - n * _C2
        e = _E0 * r + _E1
        e = e * r + _E2
        e = e * r + _E3
        e = e * r + _E4
        e = e * r + _E5
        return (e * (r * r) + (r + 1.0)) * _pow2(tl.where(_finite(n), n, 0.0))

    @triton.jit
    def _gelu(x):
        """sensimix.a8.gelu, operation for operation."""
        z = tl.abs(x) * _SQRT_HALF
        beyond = z > _Z_MAX
        z = tl.where(beyond, _Z_MAX, z)  # NaN stays NaN (the comparison is false)
        t = tl.math.div_rn(1.0, 1.0 + _P * z)
        poly = _A0 * t + _A1
        poly = poly * t + _A2
        poly = poly * t + _A3
        poly = poly * t + _A4
        poly = poly * t
        erfc = tl.where(beyond, 0.0, poly * _exp_neg(-(z * z)))
        return (0.5 * x) * tl.where(x < 0, erfc, 2.0 - erfc)

    @triton.jit
    def quantize_kernel(x_ptr, stride_x, q_ptr, stride_q, zero_ptr, scale_ptr, total_ptr, stride_s, part_ptr,
                        n_parts, M, K, ROWS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
                        HAS_PARTS: tl.constexpr):
        """ROWS rows per program: the A8 rule (sensimix.a8.quantize_rows) into the operand's int8 values (q - 128)
        and its zero, scale and total. With HAS_PARTS the rows' ranges come from the [lo, hi, bad] a GEMM's
        epilogue wrote per output tile (one pass over x fewer), else from a first pass over x."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        in_row = rows < M
        offs = tl.arange(0, BLOCK)
        x_rows = x_ptr + rows[:, None] * stride_x
        if HAS_PARTS:
            p = tl.arange(0, BLOCK_P)
            seen = in_row[:, None] & (p < n_parts)[None, :]
            base = part_ptr + (rows[:, None] * n_parts + p[None, :]) * 3
            lo = tl.minimum(tl.min(tl.load(base, mask=seen, other=0.0), axis=1), 0.0)
            hi = tl.maximum(tl.max(tl.load(base + 1, mask=seen, other=0.0), axis=1), 0.0)
            bad = tl.sum(tl.load(base + 2, mask=seen, other=0.0), axis=1)
        else:
            lo = tl.zeros((ROWS,), tl.float32)
            hi = tl.zeros((ROWS,), tl.float32)
            bad = tl.zeros((ROWS,), tl.float32)
            for k0 in range(0, K, BLOCK):
                cols = k0 + offs
                inside = in_row[:, None] & (cols < K)[None, :]
                x = tl.load(x_rows + cols[None, :], mask=inside, other=0.0)
                fin = _finite(x)
                bad += tl.sum((inside & ~fin).to(tl.float32), axis=1)
                xs = tl.where(fin, x, 0.0)
                lo = tl.minimum(lo, tl.min(xs, axis=1))
                hi = tl.maximum(hi, tl.max(xs, axis=1))
        live, inv, zero, scale = _row_rule(lo, hi, bad)
        total = tl.zeros((ROWS,), tl.int32)
        for k0 in range(0, K, BLOCK):
            cols = k0 + offs
            inside = in_row[:, None] & (cols < K)[None, :]
            x = tl.load(x_rows + cols[None, :], mask=inside, other=0.0)
            qi = _quantize_values(x, inv[:, None], zero[:, None], live[:, None])
            total += tl.sum(tl.where(inside, qi, 0), axis=1)
            tl.store(q_ptr + rows[:, None] * stride_q + cols[None, :], (qi - 128).to(tl.int8), mask=inside)
        tl.store(zero_ptr + rows * stride_s, zero.to(tl.int32), mask=in_row)
        tl.store(scale_ptr + rows * stride_s, scale, mask=in_row)
        tl.store(total_ptr + rows * stride_s, total - zero.to(tl.int32) * K, mask=in_row)

    @triton.jit
    def gemm_kernel(a_ptr, stride_a, zero_ptr, scale_ptr, total_ptr, stride_s, w_ptr, stride_w, params_ptr,
                    bias_ptr, res_ptr, stride_res, out_ptr, stride_out, part_ptr, M, N, K,
                    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, RANGE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """y = ((f32(A) * s + f32(total) * c) * scale) + b, then GELU/ReLU, then + residual, for the exact integers
        A = (q - zero) . Q (sensimix.a8.linear_epilogue). a: int8 (q - 128) [M, K]; w: int8 Q [N, K]; params: fp32
        [3, N] rows s, c, colsum. With RANGE, each row's [lo, hi, non-finite count] over this tile's columns goes
        to part_ptr [M, cdiv(N, BLOCK_N), 3] for the quantization of y (the next GEMM's operand)."""
        pid = tl.program_id(0)
        grid_m = tl.cdiv(M, BLOCK_M)
        grid_n = tl.cdiv(N, BLOCK_N)
        group = GROUP_M * grid_n
        first_m = (pid // group) * GROUP_M
        size_m = tl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % size_m
        pid_n = (pid % group) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        in_m = rm < M
        in_n = rn < N
        a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_a
        w_cols = w_ptr + rn.to(tl.int64)[None, :] * stride_w
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + rk
            a = tl.load(a_rows + ks[None, :], mask=in_m[:, None] & (ks[None, :] < K), other=0)
            b = tl.load(w_cols + ks[:, None], mask=(ks[:, None] < K) & in_n[None, :], other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        zero = tl.load(zero_ptr + rm * stride_s, mask=in_m, other=128)
        total = tl.load(total_ptr + rm * stride_s, mask=in_m, other=0)
        scale = tl.load(scale_ptr + rm * stride_s, mask=in_m, other=0.0)
        s = tl.load(params_ptr + rn, mask=in_n, other=0.0)
        c = tl.load(params_ptr + N + rn, mask=in_n, other=0.0)
        colsum = tl.load(params_ptr + 2 * N + rn, mask=in_n, other=0.0).to(tl.int32)
        acc = acc + (128 - zero)[:, None] * colsum[None, :]
        t1 = acc.to(tl.float32) * s[None, :]
        t2 = total.to(tl.float32)[:, None] * c[None, :]
        y = (t1 + t2) * scale[:, None]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + rn, mask=in_n, other=0.0)[None, :]
        if ACT == 1:
            y = _gelu(y)
        if ACT == 2:
            y = tl.where(y < 0, 0.0, y)
        inside = in_m[:, None] & in_n[None, :]
        if HAS_RES:
            y = y + tl.load(res_ptr + rm.to(tl.int64)[:, None] * stride_res + rn[None, :], mask=inside, other=0.0)
        tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_out + rn[None, :], y, mask=inside)
        if RANGE:
            fin = _finite(y)
            ys = tl.where(inside & fin, y, 0.0)
            base = part_ptr + (rm.to(tl.int64) * grid_n + pid_n) * 3
            tl.store(base, tl.min(ys, axis=1), mask=in_m)
            tl.store(base + 1, tl.max(ys, axis=1), mask=in_m)
            tl.store(base + 2, tl.sum((inside & ~fin).to(tl.float32), axis=1), mask=in_m)

    @triton.jit
    def layer_norm_kernel(x_ptr, stride_x, w_ptr, b_ptr, eps, y_ptr, stride_y, q_ptr, stride_q, zero_ptr, scale_ptr,
                          total_ptr, stride_s, M, N, ROWS: tl.constexpr, BLOCK: tl.constexpr, QUANT: tl.constexpr):
        """ROWS rows per program: sensimix.a8.layer_norm (fp64 moments, each rounded once to fp32), and with QUANT
        the A8 rule on the result (the operand of the linear that reads it: Q/K/V, or an FFN's first)."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        in_row = rows < M
        cols = tl.arange(0, BLOCK)
        in_col = cols < N
        inside = in_row[:, None] & in_col[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=inside, other=0.0)
        xd = x.to(tl.float64)
        mean = (tl.sum(xd, axis=1) / N).to(tl.float32)
        diff = tl.where(inside, xd - mean.to(tl.float64)[:, None], 0.0)
        var = (tl.sum(diff * diff, axis=1) / N).to(tl.float32)
        rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(var + eps))
        w = tl.load(w_ptr + cols, mask=in_col, other=0.0)
        b = tl.load(b_ptr + cols, mask=in_col, other=0.0)
        y = ((x - mean[:, None]) * rstd[:, None]) * w[None, :] + b[None, :]
        tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y, mask=inside)
        if QUANT:
            fin = _finite(y)
            bad = tl.sum((inside & ~fin).to(tl.float32), axis=1)
            ys = tl.where(inside & fin, y, 0.0)
            lo = tl.minimum(tl.min(ys, axis=1), 0.0)
            hi = tl.maximum(tl.max(ys, axis=1), 0.0)
            live, inv, zero, scale = _row_rule(lo, hi, bad)
            qi = _quantize_values(y, inv[:, None], zero[:, None], live[:, None])
            total = tl.sum(tl.where(inside, qi, 0), axis=1)
            tl.store(q_ptr + rows[:, None] * stride_q + cols[None, :], (qi - 128).to(tl.int8), mask=inside)
            tl.store(zero_ptr + rows * stride_s, zero.to(tl.int32), mask=in_row)
            tl.store(scale_ptr + rows * stride_s, scale, mask=in_row)
            tl.store(total_ptr + rows * stride_s, total - zero.to(tl.int32) * N, mask=in_row)

    @triton.jit
    def gelu_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        """sensimix.a8.gelu elementwise (tests: the GELU on its own)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        tl.store(y_ptr + offs, _gelu(tl.load(x_ptr + offs, mask=inside, other=0.0)), mask=inside)
