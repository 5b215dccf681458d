"""The one int8 GEMM the kernels call: :func:`int_mm` (``a [M, K] @ b [K, N]``, int8 in, int32 out), exact for every
shape it accepts, on CPU and CUDA.

``torch._int_mm`` is a thin wrapper over oneDNN's gemm API (CPU) and cuBLASLt (CUDA), and both get some shapes
silently wrong (no error, a wrong number):

* CPU, K = 1: the output is left uninitialised (measured on torch 2.13, an AVX512-VNNI AMD EPYC: every M, every
  N >= 2, e.g. ``_int_mm(ones(3, 1), ones(8, 1).t())`` gave -2,066,522,096 and 32,607 for 1), so the exact 1-bit
  ``int8`` kernel gave logits 0.04 to 0.58 off the QAT model for ``intermediate_size=1``, different on every run;
* CPU, a size-1 dimension whose stride is not the canonical one (e.g. 0, which torch allows and ``.contiguous()``
  keeps): oneDNN reads the leading dimension from the stride and rejects the call, leaving the output as it was
  (pytorch#195066);
* CPU without AVX512-VNNI: oneDNN's AVX2 path saturated int16 pair sums (pytorch#136746); torch >= 2.6 runs a
  reference loop there instead: right, but slow (:func:`sensimix.kernels.torch_ops.int_mm_fast_on` says so);
* CUDA (cuBLASLt): K and N must be multiples of 8 and M > 16 (:func:`pad_for_int_mm`; pytorch#107671).

So :func:`int_mm` (1) answers empty operands with zeros, (2) copies an operand whose strides are not the canonical
ones (A row-major ``(K, 1)``, B column-major ``(1, K)``, size-1 dimensions included), (3) pads K = 1 with a zero
column on CPU and pads per :func:`pad_for_int_mm` on CUDA (zeros add nothing to a product), and (4) checks once per
process and device, on :data:`PROBES`, that what it calls gives the float64 products exactly. Where that check
fails, :func:`int_mm` computes in float64 instead (exact: ``K * 2^14 < 2^53``), :func:`trusted` returns the reason
(on CPU no int8 kernel is then a default: :func:`sensimix.kernels.torch_ops.int_mm_fast_on`) and one warning names
the shape. ``unit/test_kernel_shapes.py`` sweeps small, odd and BERT-like shapes and strides through it and
through every kernel.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# (M, K, N) checked at first use: K = 1 and tiny, odd and BERT-like shapes, N = 1, M <= 16 and M > 16
PROBES = ((1, 1, 1), (3, 1, 8), (2, 2, 5), (5, 3, 1), (1, 7, 9), (17, 33, 65), (33, 768, 40), (4, 3072, 3))


def has_int_mm() -> bool:
    return hasattr(torch, "_int_mm")


def pad_for_int_mm(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``a`` [M, K] and ``b`` [K, N] for cuBLASLt int8: K and N multiples of 8, M > 16.

    Zero rows/columns add nothing to the products, so the [M, N] corner of the result is unchanged.
    ``b`` keeps its column-major layout (the fast one for cuBLASLt int8).
    """
    m, k = a.shape
    n = b.shape[1]
    kp, np_, mp = -(-k // 8) * 8, -(-n // 8) * 8, max(m, 17)
    if (kp, mp) != (k, m):
        a = F.pad(a, (0, kp - k, 0, mp - m))
    if (kp, np_) != (k, n):
        b = F.pad(b.t(), (0, kp - k, 0, np_ - n)).t()
    return a, b


def _canonical(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A with strides exactly (K, 1), B exactly (1, K): ``is_contiguous`` ignores the stride of a size-1 dimension,
    oneDNN does not, so the strides themselves are compared."""
    m, k = a.shape
    n = b.shape[1]
    if a.stride() != (k, 1):
        a = torch.empty((m, k), dtype=a.dtype, device=a.device).copy_(a)
    if b.stride() != (1, k):
        b = torch.empty((n, k), dtype=b.dtype, device=b.device).copy_(b.t()).t()
    return a, b


def _guarded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch._int_mm on operands reshaped to what each backend computes right (the module docstring)."""
    m, n = a.shape[0], b.shape[1]
    a, b = _canonical(a, b)
    if a.is_cuda:
        a, b = pad_for_int_mm(a, b)
        return torch._int_mm(a, b)[:m, :n]
    if a.shape[1] == 1:  # K = 1: one zero column (oneDNN leaves the output unwritten otherwise)
        a, b = F.pad(a, (0, 1)), F.pad(b.t(), (0, 1)).t()
    return torch._int_mm(a, b)


def _exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The products in float64: exact, since |sum| <= K * 2^14 < 2^53."""
    return torch.mm(a.double(), b.double()).to(torch.int32)


def _device_key(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.current_device() if device.index is None else device.index}"
    return device.type


@functools.lru_cache(maxsize=None)
def _self_test(device: str) -> str | None:
    if not has_int_mm():
        return f"torch {torch.__version__} has no torch._int_mm"
    g = torch.Generator().manual_seed(0)
    cases = [(torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8),
              torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8).t()) for m, k, n in PROBES]
    # extremes: int16 pair sums of -128 * -128 overflow (the AVX2 saturation of pytorch#136746)
    cases.append((torch.full((3, 64), -128, dtype=torch.int8), torch.full((5, 64), -128, dtype=torch.int8).t()))
    cases.append((torch.full((3, 64), 127, dtype=torch.int8), torch.full((5, 64), -128, dtype=torch.int8).t()))
    for a, b in cases:
        try:
            got = _guarded(a.to(device), b.to(device)).cpu()
        except RuntimeError as exc:  # an unsupported device or build: not trusted, said once
            reason = f"torch._int_mm failed on {device} for [M, K, N] = {[a.shape[0], *b.shape]}: {exc}"
            log.warning("%s; int8 GEMMs there run in float64 (exact, slower)", reason)
            return reason
        want = _exact(a, b)
        if not torch.equal(got, want):
            worst = int((got.long() - want.long()).abs().max())
            reason = (f"torch._int_mm gave wrong products on {device} for [M, K, N] = {[a.shape[0], *b.shape]} "
                      f"(off by up to {worst:,})")
            log.warning("%s; int8 GEMMs there run in float64 (exact, slower)%s", reason,
                        "" if device.startswith("cuda") else " and no int8 kernel is a default")
            return reason
    return None


def trusted(device: torch.device | str) -> str | None:
    """None where :func:`int_mm` runs on torch._int_mm on ``device``, else why not (checked once per process and
    device, at the first call; the reason is logged once): :func:`int_mm` is then exact in float64, not fast."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return f"int_mm runs on CPU and CUDA, not {device.type}"
    return _self_test(_device_key(device))


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for int8 ``a`` [M, K] and ``b`` [K, N] (any strides; column-major B is the fast layout), int32,
    exact for every shape on CPU and CUDA (see the module docstring for what is guarded and why)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"int_mm: expected a [M, K] and b [K, N], got {list(a.shape)} and {list(b.shape)}")
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise ValueError(f"int_mm: expected int8 operands, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"int_mm: operands on {a.device} and {b.device}")
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros((m, n), dtype=torch.int32, device=a.device)
    if trusted(a.device) is not None:
        return _exact(a, b)
    return _guarded(a, b)
