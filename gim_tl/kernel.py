"""Fused Triton kernel for the TSG backward (:func:`gim_tl.rules.tsg_grad`; GIM, arXiv:2505.17630).

Per attention row, with ``g = ∂L/∂A`` and the re-tempered pattern ``A_T = softmax(S / T)``::

    dS = A_T ⊙ (g − Σ_k A_T,k g_k)          (no 1/T factor; fp32 math and output)

Eager PyTorch needs about six passes over ``[batch, head, query, key]`` tensors for this
(divide, max, exp, sum, product, sum, product). Here every row is handled by one program:

* **Fused path** (``key ≤ MAX_FUSED_COLS``): the row — or a ``[rows, key]`` tile of several
  short rows — is loaded into registers once, reduced in place, and ``dS`` is written once.
  Each input element is read once and each output element written once, like the fused
  softmax of the Triton tutorial.
* **Looped path** (longer rows): one sweep over ``LOOP_BLOCK``-sized chunks keeps a running
  max, ``Σ p`` and ``Σ p·g`` per lane (online softmax), a second sweep writes ``dS``. Inputs
  are read twice, the output written once.

``A_T`` comes from the scores ``S`` (``source_is_scores=True``) or from the pattern
``A = softmax(S)``, using ``softmax(S/T) = A^(1/T) / Σ A^(1/T)``. Both are computed as
``exp2((x − max x) · c)`` with ``x = S, c = log2(e)/T`` or ``x = log2 A, c = 1/T``, so neither
path overflows or underflows where the exact value is representable.

Masks. Scores at or below ``finfo(source.dtype).min / 2`` (``-inf`` from HookedTransformer,
``finfo.min`` from TransformerBridge) and pattern entries ``≤ 0`` are masked keys: their ``g``
is not even loaded, and ``dS = 0`` there. A row with no valid key gives ``dS = 0`` (never NaN).
``row_valid`` zeroes whole rows more (a bridge row that is fully masked has a uniform pattern,
which the kernel cannot tell from a real one).

Precision of fp16 patterns. Pattern entries below half the smallest fp16 subnormal
(``2^-25 ≈ 3e-8``) round to 0 and entries below ``2^-14 ≈ 6e-5`` keep only a few bits, so
``A_T`` rebuilt from an fp16 pattern drops keys whose tempered weight is up to about
``(3e-8)^(1/T)`` (``≈1.7e-4`` at ``T = 2``, ``≈7e-3`` at ``T = 3.5``) and has absolute
errors of that size. bf16 and fp32 share fp32's exponent range, so there the only error is the
ordinary rounding (bf16: ``2^-8`` per entry, at most about ``2^-7 / T`` relative on ``A_T``).
Keep the scores for fp16 models.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from gim_tl.masks import mask_threshold

__all__ = ["triton_available", "tsg_backward", "MAX_FUSED_COLS", "LOOP_BLOCK"]

#: Longest key length handled by the single-pass, in-register kernel.
MAX_FUSED_COLS = 8192
#: Chunk width of the looped kernel used for longer rows.
LOOP_BLOCK = 2048
#: Target elements per program in the fused kernel (short rows are packed several per tile).
_TILE_ELEMS = 2048
#: Narrowest tile in the key dimension (tiny ``tl.arange`` ranges are avoided).
_MIN_BLOCK_N = 16

_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Set by ``_load_triton``; the kernels below resolve ``tl`` from module globals when compiled.
triton = None
tl = None
_KERNELS: dict[bool, tuple] = {}


# --------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------


def _load_triton() -> bool:
    """Import triton once; ``False`` when it is not installed (or fails to import)."""
    global triton, tl
    if tl is not None:
        return True
    try:
        import triton as _triton
        import triton.language as _tl
    except Exception:  # ImportError, or a broken install / driver probe
        return False
    triton, tl = _triton, _tl
    return True


def _interpret_mode() -> bool:
    """Whether triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _interpreter_ready() -> bool:
    """False when ``TRITON_INTERPRET=1`` came after ``triton.language`` was imported.

    ``triton.jit`` picks compiled or interpreted at decoration time, and triton's own helpers
    (``tl.max``, ``tl.sum``, ...) are decorated on import; compiled helpers cannot run in the
    interpreter. Our kernels are decorated on first use, so only the import order matters.
    """
    from triton.runtime.jit import JITFunction

    return not isinstance(getattr(tl, "max", None), JITFunction)


def triton_available() -> bool:
    """True when triton imports and can run: a CUDA device, or ``TRITON_INTERPRET=1``.

    (With no CUDA device, ``TRITON_INTERPRET=1`` must be set before triton is first imported.)
    """
    if not _load_triton():
        return False
    if torch.cuda.is_available():
        return True
    return _interpret_mode() and _interpreter_ready()


# --------------------------------------------------------------------------------------
# Kernels (plain functions; wrapped with ``triton.jit`` on first use, see ``_kernels``)
# --------------------------------------------------------------------------------------


def _tsg_fused_kernel(
    src_ptr, g_ptr, out_ptr, valid_ptr,
    n_rows, n_cols, src_row_stride, g_row_stride,
    scale, mask_thresh,
    SOURCE_IS_SCORES: tl.constexpr, HAS_ROW_VALID: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``dS`` for a ``[BLOCK_M, BLOCK_N]`` tile of whole rows, all in registers."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_in = rows < n_rows
    in_bounds = row_in[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)

    src = tl.load(src_ptr + rows64[:, None] * src_row_stride + cols[None, :],
                  mask=in_bounds, other=0.0).to(tl.float32)
    if SOURCE_IS_SCORES:
        key_ok = in_bounds & (src > mask_thresh)
        x = tl.where(key_ok, src, float("-inf"))
    else:
        key_ok = in_bounds & (src > 0.0)
        x = tl.where(key_ok, tl.log2(tl.where(key_ok, src, 1.0)), float("-inf"))
    g = tl.load(g_ptr + rows64[:, None] * g_row_stride + cols[None, :],
                mask=key_ok, other=0.0).to(tl.float32)

    row_max = tl.max(x, axis=1)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    p = tl.exp2((x - row_max[:, None]) * scale)  # 0 at masked keys
    total = tl.sum(p, axis=1)
    inv_total = tl.where(total > 0.0, 1.0 / tl.where(total > 0.0, total, 1.0), 0.0)
    if HAS_ROW_VALID:
        valid = tl.load(valid_ptr + rows64, mask=row_in, other=0)
        inv_total = tl.where(valid != 0, inv_total, 0.0)
    a_t = p * inv_total[:, None]
    mean_g = tl.sum(a_t * g, axis=1)
    d_scores = a_t * (g - mean_g[:, None])
    tl.store(out_ptr + rows64[:, None] * n_cols + cols[None, :], d_scores, mask=in_bounds)


def _tsg_looped_kernel(
    src_ptr, g_ptr, out_ptr, valid_ptr,
    n_cols, src_row_stride, g_row_stride,
    scale, mask_thresh,
    SOURCE_IS_SCORES: tl.constexpr, HAS_ROW_VALID: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``dS`` for one row of any length: an online-softmax sweep, then a writing sweep."""
    row = tl.program_id(0).to(tl.int64)
    src_row = src_ptr + row * src_row_stride
    g_row = g_ptr + row * g_row_stride
    out_row = out_ptr + row * n_cols
    offs = tl.arange(0, BLOCK_N)

    # Sweep 1: per-lane running max m, Σ p and Σ p·g, with p = exp2((x − m) · scale).
    lane_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    lane_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    lane_dot = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + offs
        in_bounds = cols < n_cols
        src = tl.load(src_row + cols, mask=in_bounds, other=0.0).to(tl.float32)
        if SOURCE_IS_SCORES:
            key_ok = in_bounds & (src > mask_thresh)
            x = tl.where(key_ok, src, float("-inf"))
        else:
            key_ok = in_bounds & (src > 0.0)
            x = tl.where(key_ok, tl.log2(tl.where(key_ok, src, 1.0)), float("-inf"))
        g = tl.load(g_row + cols, mask=key_ok, other=0.0).to(tl.float32)
        new_max = tl.maximum(lane_max, x)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp2((lane_max - safe_max) * scale)  # 0 while the lane has seen no key
        p = tl.exp2((x - safe_max) * scale)
        lane_sum = lane_sum * rescale + p
        lane_dot = lane_dot * rescale + p * g
        lane_max = new_max

    row_max = tl.max(lane_max, axis=0)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    lane_w = tl.exp2((lane_max - row_max) * scale)
    total = tl.sum(lane_sum * lane_w, axis=0)
    inv_total = tl.where(total > 0.0, 1.0 / tl.where(total > 0.0, total, 1.0), 0.0)
    if HAS_ROW_VALID:
        inv_total = tl.where(tl.load(valid_ptr + row) != 0, inv_total, 0.0)
    mean_g = tl.sum(lane_dot * lane_w, axis=0) * inv_total

    # Sweep 2: recompute A_T chunk by chunk and write dS.
    for start in range(0, n_cols, BLOCK_N):
        cols = start + offs
        in_bounds = cols < n_cols
        src = tl.load(src_row + cols, mask=in_bounds, other=0.0).to(tl.float32)
        if SOURCE_IS_SCORES:
            key_ok = in_bounds & (src > mask_thresh)
            x = tl.where(key_ok, src, float("-inf"))
        else:
            key_ok = in_bounds & (src > 0.0)
            x = tl.where(key_ok, tl.log2(tl.where(key_ok, src, 1.0)), float("-inf"))
        g = tl.load(g_row + cols, mask=key_ok, other=0.0).to(tl.float32)
        a_t = tl.exp2((x - row_max) * scale) * inv_total
        tl.store(out_row + cols, a_t * (g - mean_g), mask=in_bounds)


def _kernels():
    """``(fused, looped)`` kernels, jitted for the current mode (GPU or interpreter)."""
    mode = _interpret_mode()
    if mode not in _KERNELS:
        _KERNELS[mode] = (triton.jit(_tsg_fused_kernel), triton.jit(_tsg_looped_kernel))
    return _KERNELS[mode]


# --------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    looped: bool
    block_m: int
    block_n: int
    num_warps: int


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _plan(n_rows: int, n_cols: int) -> _Plan:
    """Tile sizes: whole rows in one block up to ``MAX_FUSED_COLS`` keys, chunks beyond."""
    if n_cols > MAX_FUSED_COLS:
        return _Plan(looped=True, block_m=1, block_n=LOOP_BLOCK,
                     num_warps=8 if LOOP_BLOCK >= 2048 else 4)
    block_n = max(_MIN_BLOCK_N, _next_power_of_2(n_cols))
    block_m = max(1, min(_TILE_ELEMS // block_n, _next_power_of_2(n_rows)))
    elems = block_m * block_n
    num_warps = 4 if elems <= 2048 else 8 if elems <= 4096 else 16
    return _Plan(looped=False, block_m=block_m, block_n=block_n, num_warps=num_warps)


def _as_rows(x: Tensor, n_cols: int) -> Tensor:
    """A ``[rows, key]`` view with unit key stride (copies only when no such view exists)."""
    if x.stride(-1) != 1 and n_cols > 1:
        x = x.contiguous()
    x = x.reshape(-1, n_cols)
    if x.stride(-1) != 1 and n_cols > 1:  # reshape of an odd view can come back strided
        x = x.contiguous()
    return x


def _validate(source: Tensor, grad: Tensor, temperature, row_valid: Tensor | None) -> float:
    if not isinstance(source, Tensor) or not isinstance(grad, Tensor):
        raise TypeError("tsg_backward: source and grad must be torch tensors")
    if source.dim() == 0:
        raise ValueError("tsg_backward: source must have at least one dim (the key dim)")
    if grad.shape != source.shape:
        raise ValueError(
            f"tsg_backward: grad shape {tuple(grad.shape)} != source shape {tuple(source.shape)}"
            " (no broadcasting)"
        )
    for name, t in (("source", source), ("grad", grad)):
        if t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(
                f"tsg_backward: {name} dtype {t.dtype} not supported; use float32, bfloat16 or float16"
            )
    if grad.device != source.device:
        raise ValueError(
            f"tsg_backward: source on {source.device} but grad on {grad.device}"
        )
    if row_valid is not None:
        if not isinstance(row_valid, Tensor) or row_valid.dtype != torch.bool:
            raise ValueError("tsg_backward: row_valid must be a bool tensor")
        if row_valid.shape != source.shape[:-1]:
            raise ValueError(
                f"tsg_backward: row_valid shape {tuple(row_valid.shape)} must equal "
                f"source.shape[:-1] = {tuple(source.shape[:-1])}"
            )
        if row_valid.device != source.device:
            raise ValueError(
                f"tsg_backward: source on {source.device} but row_valid on {row_valid.device}"
            )
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"tsg_backward: temperature must be a number, got {temperature!r}") from None
    if not (t > 0.0 and t != float("inf")):
        raise ValueError(f"tsg_backward: temperature must be finite and > 0, got {t}")
    return t


def tsg_backward(
    source: Float[Tensor, "*rows key"],
    grad: Float[Tensor, "*rows key"],
    temperature: float,
    *,
    source_is_scores: bool,
    row_valid: Bool[Tensor, "*rows"] | None = None,
) -> Float[Tensor, "*rows key"]:
    """TSG score gradient ``dS = A_T ⊙ (g − Σ_k A_T,k g_k)``, ``A_T = softmax(S/T)``, fused.

    Computes :func:`gim_tl.rules.tsg_grad` of :func:`gim_tl.rules.tempered_softmax`; same contract as
    :func:`gim_tl.fast.tsg_grad_scores_torch`.

    Args:
        source: scores ``S`` (``source_is_scores=True``; masked keys are ``-inf`` or
            ``≤ finfo(dtype).min / 2``) or the pattern ``A = softmax(S)`` (masked keys 0).
            fp32, bf16 or fp16; any leading shape, e.g. ``[batch, head, query, key]``.
        grad: ``∂L/∂A``, same shape as ``source``; fp32, bf16 or fp16 (may differ from source).
        temperature: ``T > 0``. ``T = 1`` is the plain softmax backward.
        source_is_scores: which of the two ``source`` holds.
        row_valid: optional bool ``source.shape[:-1]``; rows where it is False give 0.

    Returns:
        ``dS`` in fp32, contiguous, shape of ``source``. Rows without a valid key are 0.

    Tensors must be on CUDA, or on the CPU with ``TRITON_INTERPRET=1`` set before triton
    is imported. The key dim is read with unit stride: an input whose key dim is strided
    (e.g. a transposed view) is copied once with ``.contiguous()``; leading dims may have
    any strides that flatten to one row stride (otherwise they are copied too).
    """
    t = _validate(source, grad, temperature, row_valid)
    if source.numel() == 0:
        return torch.empty(source.shape, dtype=torch.float32, device=source.device)
    if not _load_triton():
        raise RuntimeError("tsg_backward needs triton (pip install triton); without it use "
                           "gim_tl.fast.tsg_grad_scores_torch")
    interpret = _interpret_mode()
    if not source.is_cuda and not interpret:
        raise ValueError(
            f"tsg_backward: tensors are on {source.device}; the kernel needs CUDA tensors, or "
            "TRITON_INTERPRET=1 set before triton is imported (CPU interpreter)"
        )
    if interpret and not _interpreter_ready():
        raise RuntimeError(
            "tsg_backward: TRITON_INTERPRET=1 was set after triton.language had been imported "
            "(its helpers are compiled-mode); set it before the first `import triton`"
        )

    n_cols = source.shape[-1]
    out = torch.empty(source.shape, dtype=torch.float32, device=source.device)
    src2 = _as_rows(source.detach(), n_cols)
    g2 = _as_rows(grad.detach(), n_cols)
    n_rows = src2.shape[0]
    if row_valid is not None:
        valid = row_valid.detach().reshape(-1).contiguous().view(torch.uint8)
    else:
        valid = src2  # never read: HAS_ROW_VALID is False

    if source_is_scores:
        scale = _LOG2E / t
        mask_thresh = mask_threshold(source.dtype)
    else:
        scale = 1.0 / t
        mask_thresh = 0.0
    fused, looped = _kernels()
    plan = _plan(n_rows, n_cols)
    common = dict(SOURCE_IS_SCORES=bool(source_is_scores), HAS_ROW_VALID=row_valid is not None,
                  BLOCK_N=plan.block_n, num_warps=plan.num_warps)
    with torch.cuda.device(source.device) if source.is_cuda else nullcontext():
        if plan.looped:
            looped[(n_rows,)](src2, g2, out, valid, n_cols, src2.stride(0), g2.stride(0),
                              scale, mask_thresh, **common)
        else:
            grid = (-(-n_rows // plan.block_m),)
            fused[grid](src2, g2, out, valid, n_rows, n_cols, src2.stride(0), g2.stride(0),
                        scale, mask_thresh, BLOCK_M=plan.block_m, **common)
    return out
