"""Attention-mask conventions shared by the TSG rule, its fast paths and the Triton kernel.

TransformerLens masks attention scores with ``-inf`` (HookedTransformer, a bridge in compatibility mode) or
with ``finfo(dtype).min`` (TransformerBridge); an additive padding mask on top of the latter gives ``-inf``.
Both are recognised by one threshold, half of ``finfo(dtype).min``: no real score comes near it.
"""

from __future__ import annotations

import functools

import torch
from jaxtyping import Bool, Float
from torch import Tensor


@functools.cache
def mask_threshold(dtype: torch.dtype) -> float:
    """Half of ``finfo(dtype).min``: scores at or below it are attention-mask values."""
    return torch.finfo(dtype).min / 2


def masked_below(x: Tensor) -> Bool[Tensor, "..."]:
    """True where ``x`` is an attention-mask value: ``-inf``, or at most half of ``finfo(dtype).min``."""
    return x <= mask_threshold(x.dtype)


def fully_masked_rows(scores: Float[Tensor, "... query key"]) -> Bool[Tensor, "... query"] | None:
    """Rows of ``scores`` with no valid key (left padding), or ``None`` when there are none (the common case).

    In causal self-attention a row is fully masked only if its diagonal entry is, so the full row check
    runs only when some diagonal entry is masked; it is cheap otherwise.
    """
    if scores.shape[-1] == scores.shape[-2] and scores.numel():
        if scores.diagonal(dim1=-2, dim2=-1).min().item() > mask_threshold(scores.dtype):
            return None
    rows = masked_below(scores).all(-1)
    return rows if rows.any() else None
