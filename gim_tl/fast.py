"""The forms of the GIM rules that the hook set runs: fused, in place, or placed on an autograd node.

Each computes what its definition in :mod:`gim_tl.rules` computes, with fewer passes over memory, fewer
tensors kept for backward, or fewer Python calls per pass; each is tested equal to that definition.

* TSG: ``A_T`` rebuilt from the pattern autograd keeps anyway (:func:`tempered_pattern`), the score
  gradient by PyTorch's fused softmax backward written over ``A_T`` (:func:`tsg_grad_scores_torch`) or, on
  CUDA, by the Triton kernel (:mod:`gim_tl.kernel`), inside one autograd Function that bypasses the
  model's own softmax node (:func:`apply_tsg`).
* Norm freeze: the node where a norm's graph computes σ gets no gradient (:func:`drop_gradient`), or,
  for a fused norm kernel with no such node, the norm's backward is replaced (:func:`apply_norm_freeze`).
* Gradient normalization: a gradient hook on the activation itself (:func:`scale_grad_by_hook`), and one
  factor on the gradient entering ``act(gate) · up`` for both of its branches (:func:`scale_node_grad`).

``map_grad_*`` / ``on_backward`` arguments are callbacks of the hook set (it runs bypassed TL backward hooks
and counts applications there); they do not change the math.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from gim_tl import kernel
from gim_tl._internals import softmax_backward_into
from gim_tl.masks import fully_masked_rows, masked_below

GradMap = Callable[[Tensor], Tensor]

# --------------------------------------------------------------------------------------
# TSG
# --------------------------------------------------------------------------------------


def as_fp32(x: Tensor) -> Tensor:
    """``x`` in fp32 (itself if it is already)."""
    return x if x.dtype == torch.float32 else x.float()


def tempered_pattern(
    source: Float[Tensor, "... key"], temperature: float, *, source_is_scores: bool, nonempty: bool = False
) -> Float[Tensor, "... key"]:
    """``A_T = softmax(S / T)`` in fp32 (:func:`gim_tl.rules.tempered_softmax`), from the scores ``S`` or from
    the pattern ``A = softmax(S)``, using ``softmax(S/T) = A^(1/T) / Σ A^(1/T)``, so the scores need not be kept.

    Masked keys give 0 either way; rows with no valid key give an all-zero row (never NaN), a guard that
    ``nonempty=True`` (every row has a valid key: checked in forward) skips. Returns a fresh buffer.
    """
    if source_is_scores:
        x = source.float() / temperature
        x.masked_fill_(masked_below(source), float("-inf"))
        return torch.softmax(x, dim=-1).nan_to_num_(0.0)
    a = as_fp32(source)
    if temperature == 2.0:
        # √a as 1/a^(-½) (within 2 ulp): CPU's sqrt kernel is slow on the exact zeros of masked keys and on
        # subnormals, rsqrt is not, and masked keys come out 0 (1/∞) with no NaN to clean up.
        weights = a.rsqrt().reciprocal_()
    else:
        weights = a.clamp_min(0).pow(1.0 / temperature)
    total = weights.sum(-1, keepdim=True)
    if not nonempty:
        total.clamp_min_(torch.finfo(torch.float32).tiny)  # all-zero rows stay 0
    return weights.div_(total)


def tsg_grad_scores_torch(
    source: Float[Tensor, "... key"],
    grad_pattern: Float[Tensor, "... key"],
    temperature: float,
    *,
    source_is_scores: bool,
    row_valid: Bool[Tensor, "..."] | None = None,
    nonempty: bool = False,
) -> Float[Tensor, "... key"]:
    """TSG's score gradient (:func:`gim_tl.rules.tsg_grad`) in fp32 by PyTorch's fused softmax backward.

    ``row_valid`` (optional, shape ``source.shape[:-1]``) zeroes rows that are fully masked but whose pattern
    does not show it (a bridge's ``finfo.min`` mask gives such a row a uniform pattern); ``nonempty`` as in
    :func:`tempered_pattern`.
    """
    a_t = tempered_pattern(source, temperature, source_is_scores=source_is_scores, nonempty=nonempty)
    # On CPU, write dS over A_T (a fresh buffer) when its rows are contiguous: one [batch, head, query, key]
    # allocation fewer (each large one is page-faulted in anew). Otherwise let the op allocate.
    in_place = a_t.device.type == "cpu" and a_t.is_contiguous()
    out = a_t if in_place else torch.empty_like(a_t, memory_format=torch.contiguous_format)
    d_scores = softmax_backward_into(as_fp32(grad_pattern), a_t, out)
    if row_valid is not None:
        d_scores.mul_(row_valid.unsqueeze(-1))
    return d_scores


def tsg_grad_scores(
    source: Float[Tensor, "... key"],
    grad_pattern: Float[Tensor, "... key"],
    temperature: float,
    *,
    source_is_scores: bool,
    row_valid: Bool[Tensor, "..."] | None = None,
    use_triton: bool = True,
    nonempty: bool = False,
) -> Float[Tensor, "... key"]:
    """TSG's score gradient in fp32: the Triton kernel for CUDA tensors, :func:`tsg_grad_scores_torch` elsewhere."""
    if use_triton and source.is_cuda and kernel.triton_available():
        return kernel.tsg_backward(source, grad_pattern, temperature,
                                   source_is_scores=source_is_scores, row_valid=row_valid)
    return tsg_grad_scores_torch(source, grad_pattern, temperature, source_is_scores=source_is_scores,
                                 row_valid=row_valid, nonempty=nonempty)


class TSGBypass(torch.autograd.Function):
    """Forward: the pattern ``A`` unchanged. Backward: TSG's score gradient, sent straight to the scores ``S``.

    Placed at ``hook_pattern``, it bypasses the model's own softmax node, so no plain softmax backward is
    computed and thrown away. It saves the pattern (kept by autograd for ``A @ V`` anyway) or, where the
    pattern is too coarse (fp16 underflow), the scores. ``map_grad_pattern`` / ``map_grad_scores`` act on
    ``∂L/∂A`` before the rule and on ``∂L/∂S`` after it.
    """

    @staticmethod
    def forward(ctx, scores, pattern, saved_source, row_valid, settings, maps):
        ctx.save_for_backward(saved_source, row_valid)
        ctx.settings = settings + (scores.dtype,)
        ctx.maps = maps
        return pattern.view_as(pattern)

    @staticmethod
    def backward(ctx, grad_pattern):
        source, row_valid = ctx.saved_tensors
        temperature, source_is_scores, use_triton, scores_dtype = ctx.settings
        map_grad_pattern, map_grad_scores = ctx.maps
        if map_grad_pattern is not None:
            grad_pattern = map_grad_pattern(grad_pattern)
        d_scores = tsg_grad_scores(source, grad_pattern, temperature, source_is_scores=source_is_scores,
                                   row_valid=row_valid, use_triton=use_triton, nonempty=row_valid is None)
        if d_scores.dtype != scores_dtype:
            d_scores = d_scores.to(scores_dtype)
        if map_grad_scores is not None:
            d_scores = map_grad_scores(d_scores)
        return d_scores, None, None, None, None, None


def apply_tsg(
    scores: Float[Tensor, "batch head query key"],
    pattern: Float[Tensor, "batch head query key"],
    temperature: float,
    *,
    keep_scores: bool = False,
    use_triton: bool = True,
    map_grad_pattern: GradMap | None = None,
    map_grad_scores: GradMap | None = None,
) -> Float[Tensor, "batch head query key"]:
    """Return ``pattern`` (same values) whose gradient flows to ``scores`` by the TSG rule.

    ``keep_scores`` rebuilds ``A_T`` from the scores instead of the pattern (fp16 patterns).
    """
    scores_value, pattern_value = scores.detach(), pattern.detach()
    masked_rows = fully_masked_rows(scores_value)
    row_valid = None if masked_rows is None else ~masked_rows
    source = scores_value if keep_scores else pattern_value
    return TSGBypass.apply(scores, pattern_value, source, row_valid, (float(temperature), keep_scores, use_triton),
                           (map_grad_pattern, map_grad_scores))


# --------------------------------------------------------------------------------------
# Gradient normalization
# --------------------------------------------------------------------------------------


def scale_grad_by_hook(x: Tensor, factor: float, on_backward: Callable[[], None] | None = None) -> Tensor:
    """``x`` itself, whose backward gradient is multiplied by ``factor`` (:func:`gim_tl.rules.scale_grad`).

    A gradient hook on ``x`` in place of a Function: no view and no extra node per site. It scales every
    use of ``x``: pass a hook point's value, which only the model's next step reads.
    """

    def scale(grad: Tensor) -> Tensor:
        if on_backward is not None:
            on_backward()
        return grad * factor

    x.register_hook(scale)
    return x


def scale_node_grad(node, factor: float, on_backward: Callable[[], None] | None = None):
    """Multiply the gradient entering autograd ``node`` (one output) by ``factor``; returns the hook's handle.

    On the node of a product ``a · b`` this is exactly :func:`gim_tl.rules.scale_grad` on ``a`` and on ``b``
    (both of their gradients are linear in the product's): gate and up at one site in place of two, while
    hooks on the product's own tensor still see the gradient before it.
    """

    def scale(grad_outputs: tuple[Tensor | None]) -> tuple[Tensor | None]:
        if on_backward is not None:
            on_backward()
        (grad,) = grad_outputs
        return (None if grad is None else grad * factor,)

    return node.register_prehook(scale)


# --------------------------------------------------------------------------------------
# Norm freeze
# --------------------------------------------------------------------------------------


def drop_gradient(node, on_backward: Callable[[], None] | None = None):
    """Give autograd ``node`` no gradient: the branch it starts is a constant in backward, as if its output
    had been detached in forward, and its nodes receive nothing to compute.

    On the node where a norm's graph computes its statistic this is :func:`gim_tl.rules.frozen_norm`, with
    the norm's own backward running for everything else (weight and bias gradients too) and nothing extra
    kept. Returns the hook's handle (``.remove()`` undoes it).
    """

    def drop(grad_outputs: tuple[Tensor, ...]) -> tuple[None, ...]:
        if on_backward is not None:
            on_backward()
        return tuple(None for _ in grad_outputs)

    return node.register_prehook(drop)


def norm_stats(
    x: Float[Tensor, "batch pos d"], eps: float, *, centered: bool
) -> tuple[Float[Tensor, "batch pos 1"] | None, Float[Tensor, "batch pos 1"]]:
    """The mean μ (None for RMSNorm) and ``1/σ`` with ``σ² = mean((x − μ)²) + eps``, in fp32."""
    xf = x.float()
    mean = xf.mean(-1, keepdim=True) if centered else None
    xc = xf if mean is None else xf - mean
    return mean, torch.linalg.vecdot(xc, xc).div_(x.shape[-1]).add_(eps).rsqrt_().unsqueeze(-1)


def frozen_norm_input_grad_from_stats(
    grad_out: Float[Tensor, "batch pos d"],
    x: Float[Tensor, "batch pos d"],
    weight: Float[Tensor, " d"] | None,
    stats: tuple[Tensor | None, Tensor],
    *,
    centered: bool,
) -> Float[Tensor, "batch pos d"]:
    """:func:`gim_tl.rules.frozen_norm_input_grad` from :func:`norm_stats` of ``x``, in place after one
    buffer; returned in x's dtype. ``weight``: the effective fp32 scale (Gemma's ``1 + w``), or None."""
    _, inv_sigma = stats
    grad_x = grad_out.float() * inv_sigma  # a fresh buffer: the rest is in place
    if weight is not None:
        grad_x.mul_(weight)
    if centered:
        grad_x.sub_(grad_x.mean(-1, keepdim=True))
    return grad_x.to(x.dtype)


def norm_param_grads(
    grad_out: Float[Tensor, "batch pos d"], x: Float[Tensor, "batch pos d"], stats: tuple[Tensor | None, Tensor],
    *, need_bias: bool = True,
) -> tuple[Float[Tensor, " d"], Float[Tensor, " d"] | None]:
    """The exact (fp32) weight and bias gradients of ``y = w ⊙ (x − μ)/σ + b``: ``Σ g ⊙ x̂`` and ``Σ g``.

    The same for Gemma's ``(1 + w)``; σ being frozen or not does not enter them. ``need_bias=False`` skips
    (and returns None for) the bias's.
    """
    mean, inv_sigma = stats
    x_hat = (x.float() if mean is None else x.float() - mean) * inv_sigma
    g = grad_out.float().reshape(-1, x.shape[-1])
    grad_w = (g * x_hat.reshape(g.shape)).sum(0)
    return grad_w, (g.sum(0) if need_bias else None)


class FrozenNorm(torch.autograd.Function):
    """Forward: a norm's output ``y`` unchanged. Backward: :func:`gim_tl.rules.frozen_norm`'s gradients (the
    frozen-statistic input gradient to ``x``, the exact weight and bias gradients), in place of the norm's
    own backward, which is not run.

    For norms that run a fused kernel whose statistic is no node of the graph (``nn.LayerNorm``). The
    statistics (``[batch, pos, 1]`` each) are computed in forward, right after the norm's own, while ``x``
    is still in cache. ``map_grad_input`` runs on the input gradient.
    """

    @staticmethod
    def forward(ctx, y, x, weight, bias, weight_offset, eps, centered, map_grad_input):
        mean, inv_sigma = norm_stats(x, eps, centered=centered)
        ctx.save_for_backward(x, mean, inv_sigma)
        ctx.settings = (weight, bias, weight_offset, centered, map_grad_input)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        x, mean, inv_sigma = ctx.saved_tensors
        weight, bias, weight_offset, centered, map_grad_input = ctx.settings
        _, need_x, need_w, need_b = ctx.needs_input_grad[:4]
        grad_x = grad_w = grad_b = None
        stats = (mean, inv_sigma)
        if need_x:
            w = None if weight is None else (weight if weight_offset == 0 else weight + weight_offset).float()
            grad_x = frozen_norm_input_grad_from_stats(grad_y, x, w, stats, centered=centered)
            if map_grad_input is not None:
                grad_x = map_grad_input(grad_x)
        if need_w or need_b:
            gw, gb = norm_param_grads(grad_y, x, stats, need_bias=need_b)
            grad_w = gw.to(weight.dtype) if need_w else None
            grad_b = gb.to(bias.dtype) if need_b else None
        return None, grad_x, grad_w, grad_b, None, None, None, None


def apply_norm_freeze(
    y: Float[Tensor, "batch pos d"],
    x: Float[Tensor, "batch pos d"],
    weight: Tensor | None,
    bias: Tensor | None = None,
    *,
    weight_offset: float = 0.0,
    eps: float,
    centered: bool,
    map_grad_input: GradMap | None = None,
) -> Float[Tensor, "batch pos d"]:
    """Return ``y`` (same values) whose backward is that of the norm ``x ↦ y`` with its statistic frozen.

    ``weight``/``bias``: the norm's parameters (their gradients are the exact ones); ``weight_offset`` what
    the norm adds to the weight (Gemma: 1); ``eps`` and ``centered`` (LayerNorm) define σ.
    """
    return FrozenNorm.apply(y.detach(), x, weight, bias, float(weight_offset), float(eps), centered,
                            map_grad_input)
