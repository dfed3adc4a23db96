"""The GIM backward rules as small pure functions, gradient hooks and one autograd Function.

Each rule is a few lines that can be checked against ``shared/docs/gim_spec.md`` §2:

* TSG (§2.1): the attention-softmax Jacobian evaluated at ``softmax(S / T)``, no ``1/T`` factor.
* Norm freeze (§2.2): the normalisation statistic (rms or σ) is a constant in backward.
* Gradient normalization (§2.3): identity forward, a constant factor on the backward gradient.

None of them changes a forward value: each returns its input, a view of it, or nothing, so a model's
forward pass is bit-identical with and without them. All GIM math runs in fp32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from jaxtyping import Bool, Float
from torch import Tensor

# --------------------------------------------------------------------------------------
# TSG: temperature-adjusted softmax gradient
# --------------------------------------------------------------------------------------


@functools.cache
def mask_threshold(dtype: torch.dtype) -> float:
    """Half of ``finfo(dtype).min``: scores at or below it are attention-mask values."""
    return torch.finfo(dtype).min / 2


def masked_below(x: Tensor) -> Tensor:
    """True where ``x`` is an attention mask value: ``-inf``, or at most half of ``finfo.min``.

    TL masks with ``-inf`` (HookedTransformer, compatibility mode) or ``finfo(dtype).min``
    (TransformerBridge); an additive padding mask on top of the latter gives ``-inf`` too.
    """
    return x <= mask_threshold(x.dtype)


def as_fp32(x: Tensor) -> Tensor:
    """``x`` in fp32 (itself if it is already): GIM's math runs in fp32 whatever the model's dtype."""
    return x if x.dtype == torch.float32 else x.float()


def tempered_pattern(
    source: Float[Tensor, "... key"], temperature: float, *, source_is_scores: bool, nonempty: bool = False
) -> Float[Tensor, "... key"]:
    """``A_T = softmax(S / T)`` in fp32, from the scores ``S`` or from the pattern ``A = softmax(S)``.

    From the pattern, ``softmax(S/T) = A^(1/T) / Σ A^(1/T)`` exactly, so the scores need not be kept.
    Masked keys give 0 either way; rows with no valid key give an all-zero row (never NaN), a guard
    that ``nonempty=True`` (every row has a valid key: checked in forward) skips.
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


def tsg_grad_scores_reference(
    source: Float[Tensor, "... key"],
    grad_pattern: Float[Tensor, "... key"],
    temperature: float,
    *,
    source_is_scores: bool,
    row_valid: Bool[Tensor, "..."] | None = None,
    nonempty: bool = False,
) -> Float[Tensor, "... key"]:
    """TSG score gradient ``dS = A_T ⊙ (g − Σ_k A_T,k g_k)`` in fp32 (the PyTorch path).

    This is the ordinary softmax backward with ``A_T`` in place of ``A``, so PyTorch's fused
    softmax-backward op computes it. ``row_valid`` (optional, shape ``source.shape[:-1]``)
    zeroes rows that are fully masked but whose pattern does not show it (TransformerBridge's
    ``finfo.min`` mask gives such a row a uniform pattern); ``nonempty`` as in :func:`tempered_pattern`.
    """
    a_t = tempered_pattern(source, temperature, source_is_scores=source_is_scores, nonempty=nonempty)
    # On CPU, write dS over A_T (a fresh buffer) when its rows are contiguous: the kernel then finishes
    # each row's dot product before writing the row, and one [batch, head, query, key] allocation fewer
    # matters there (each large one is page-faulted in anew). Otherwise let the op allocate.
    in_place = a_t.device.type == "cpu" and a_t.is_contiguous()
    out = a_t if in_place else torch.empty_like(a_t, memory_format=torch.contiguous_format)
    d_scores = torch._softmax_backward_data(as_fp32(grad_pattern), a_t, -1, torch.float32, grad_input=out)
    if row_valid is not None:
        d_scores.mul_(row_valid.unsqueeze(-1))
    return d_scores


def fully_masked_rows(scores: Float[Tensor, "... query key"]) -> Bool[Tensor, "... query"] | None:
    """Rows of ``scores`` with no valid key, or ``None`` when there are none (the common case).

    In causal self-attention a row is fully masked only if its diagonal entry is, so the full
    row check runs only when some diagonal entry is masked (left padding); it is cheap otherwise.
    """
    if scores.shape[-1] == scores.shape[-2] and scores.numel():
        if scores.diagonal(dim1=-2, dim2=-1).min().item() > mask_threshold(scores.dtype):
            return None
    rows = masked_below(scores).all(-1)
    return rows if rows.any() else None


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
    """TSG score gradient in fp32: the fused Triton kernel for CUDA tensors, PyTorch elsewhere."""
    if use_triton and source.is_cuda:
        from gim_tl import kernel

        if kernel.triton_available():
            return kernel.tsg_backward(
                source, grad_pattern, temperature,
                source_is_scores=source_is_scores, row_valid=row_valid,
            )
    return tsg_grad_scores_reference(source, grad_pattern, temperature, source_is_scores=source_is_scores,
                                     row_valid=row_valid, nonempty=nonempty)


GradMap = Callable[[Tensor], Tensor]


class TSGSoftmax(torch.autograd.Function):
    """Forward: the pattern ``A`` unchanged. Backward: the TSG gradient sent to the scores ``S``.

    Placed at ``hook_pattern``, it bypasses the model's own softmax node, so no plain softmax
    backward is computed and thrown away. It saves the pattern (already kept by autograd for
    ``A @ V``) or, where the pattern is too coarse (fp16 underflow), the scores.
    ``map_grad_pattern`` / ``map_grad_scores`` let the caller act on ``dL/dA`` before the rule and
    on ``dL/dS`` after it (the hook set runs the bypassed hook points' backward hooks there).
    """

    @staticmethod
    def forward(ctx, scores, pattern, saved_source, row_valid, temperature, source_is_scores,
                use_triton, map_grad_pattern, map_grad_scores):
        ctx.save_for_backward(saved_source, row_valid)
        ctx.settings = (temperature, source_is_scores, use_triton, scores.dtype)
        ctx.maps = (map_grad_pattern, map_grad_scores)
        return pattern.view_as(pattern)

    @staticmethod
    def backward(ctx, grad_pattern):
        source, row_valid = ctx.saved_tensors
        temperature, source_is_scores, use_triton, scores_dtype = ctx.settings
        map_grad_pattern, map_grad_scores = ctx.maps
        if map_grad_pattern is not None:
            grad_pattern = map_grad_pattern(grad_pattern)
        d_scores = tsg_grad_scores(
            source, grad_pattern, temperature, source_is_scores=source_is_scores,
            row_valid=row_valid, use_triton=use_triton, nonempty=row_valid is None,
        )
        if d_scores.dtype != scores_dtype:
            d_scores = d_scores.to(scores_dtype)
        if map_grad_scores is not None:
            d_scores = map_grad_scores(d_scores)
        return d_scores, None, None, None, None, None, None, None, None


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

    ``keep_scores`` recomputes ``A_T`` from the scores instead of the pattern (fp16 patterns).
    """
    scores_value, pattern_value = scores.detach(), pattern.detach()
    masked_rows = fully_masked_rows(scores_value)
    row_valid = None if masked_rows is None else ~masked_rows
    source = scores_value if keep_scores else pattern_value
    return TSGSoftmax.apply(scores, pattern_value, source, row_valid, float(temperature),
                            keep_scores, use_triton, map_grad_pattern, map_grad_scores)


# --------------------------------------------------------------------------------------
# Gradient normalization: identity forward, scaled backward
# --------------------------------------------------------------------------------------


def scale_grad(
    x: Tensor, factor: float, on_backward: Callable[[], None] | None = None
) -> Tensor:
    """``x`` itself, whose backward gradient is multiplied by ``factor`` (q, k: ¼; v, gate, up: ½).

    The gradient hook sits on ``x``, so it scales every use of ``x``: pass a hook point's value,
    which only the model's next step reads. (A hook on a fresh view would limit it to one branch,
    at the cost of a view op and a view node per site, ~90 sites a pass on a 30-layer model.)
    """

    def scale(grad: Tensor) -> Tensor:
        if on_backward is not None:
            on_backward()
        return grad * factor

    x.register_hook(scale)
    return x


def scale_node_grad(node, factor: float, on_backward: Callable[[], None] | None = None):
    """Multiply the gradient entering autograd ``node`` (one output) by ``factor``; returns the hook's handle.

    On the node of a product ``a · b`` this scales both factors' gradients exactly (gate and up:
    one site in place of two), while hooks on the product's own tensor still see the gradient before it.
    """

    def scale(grad_outputs: tuple[Tensor | None]) -> tuple[Tensor | None]:
        if on_backward is not None:
            on_backward()
        (grad,) = grad_outputs
        return (None if grad is None else grad * factor,)

    return node.register_prehook(scale)


def product_node(y: Tensor, names: tuple[str, ...]):
    """The autograd node of the product behind ``y``, or None if ``y``'s graph is not the one expected.

    ``names``: the nodes from ``y``'s own to the product along first inputs, e.g. ``("MulBackward0",)``
    for ``y = act(gate) · up``, ``("AddBackward0", "MulBackward0")`` for ``y = act(gate) · up + b``.
    TL's wrapper for a backward hook on ``y``'s hook point is stepped over.
    """
    node = y.grad_fn
    while node is not None and node.name() == "BackwardHookFunctionBackward":
        node = node.next_functions[0][0]
    if node is None or node.name() != names[0]:
        return None
    return graph_node(node, (0,) * (len(names) - 1), names[1:])


def capture_grad(y: Tensor, store: Callable[[Tensor], None]) -> None:
    """Hand ``y``'s total backward gradient to ``store`` (read-only: the gradient flows on unchanged)."""

    def read(grad: Tensor) -> None:
        store(grad)

    y.register_hook(read)


# --------------------------------------------------------------------------------------
# Norm freeze
# --------------------------------------------------------------------------------------


def freeze_scale(scale: Float[Tensor, "batch pos 1"]) -> Float[Tensor, "batch pos 1"]:
    """The norm statistic as a backward constant: where ``hook_scale`` is in the graph, detach it."""
    return scale.detach()


def norm_stats(
    x: Float[Tensor, "batch pos d"], eps: float, *, centered: bool
) -> tuple[Float[Tensor, "batch pos 1"] | None, Float[Tensor, "batch pos 1"]]:
    """The mean μ (None for RMSNorm) and ``1/σ`` with ``σ² = mean((x − μ)²) + eps``, in fp32."""
    xf = x.float()
    mean = xf.mean(-1, keepdim=True) if centered else None
    xc = xf if mean is None else xf - mean
    return mean, torch.linalg.vecdot(xc, xc).div_(x.shape[-1]).add_(eps).rsqrt_().unsqueeze(-1)


def frozen_norm_input_grad(
    grad_out: Float[Tensor, "batch pos d"],
    x: Float[Tensor, "batch pos d"],
    weight: Float[Tensor, " d"] | None,
    eps: float,
    *,
    centered: bool,
    stats: tuple[Tensor | None, Tensor] | None = None,
) -> Float[Tensor, "batch pos d"]:
    """Input gradient of ``y = w ⊙ (x − μ)/σ + b`` with σ a constant: ``(I − 11ᵀ/d)(g ⊙ w)/σ``.

    RMSNorm (μ = 0): ``(g ⊙ w)/σ``. ``σ² = mean((x − μ)²) + eps`` is recomputed from ``x`` unless
    ``stats`` (:func:`norm_stats` of ``x``) is given; ``weight`` is the effective ``w``
    (Gemma's ``1 + w``; None for none). In fp32, returned in x's dtype.
    """
    _, inv_sigma = stats if stats is not None else norm_stats(x, eps, centered=centered)
    grad_x = grad_out.float() * inv_sigma  # a fresh buffer: the rest is in place
    if weight is not None:
        grad_x.mul_(weight)
    if centered:
        grad_x.sub_(grad_x.mean(-1, keepdim=True))
    return grad_x.to(x.dtype)


def norm_param_grads(
    grad_out: Float[Tensor, "batch pos d"], x: Float[Tensor, "batch pos d"], eps: float, *, centered: bool,
    stats: tuple[Tensor | None, Tensor] | None = None, need_bias: bool = True,
) -> tuple[Float[Tensor, " d"], Float[Tensor, " d"] | None]:
    """The exact (fp32) weight and bias gradients of ``y = w ⊙ (x − μ)/σ + b``: ``Σ g ⊙ x̂`` and ``Σ g``.

    The same for Gemma's ``(1 + w)``; σ being frozen or not does not enter them. ``stats`` as in
    :func:`frozen_norm_input_grad`; ``need_bias=False`` skips (and returns None for) the bias's.
    """
    mean, inv_sigma = stats if stats is not None else norm_stats(x, eps, centered=centered)
    x_hat = (x.float() if mean is None else x.float() - mean) * inv_sigma
    g = grad_out.float().reshape(-1, x.shape[-1])
    grad_w = (g * x_hat.reshape(g.shape)).sum(0)
    return grad_w, (g.sum(0) if need_bias else None)


class FrozenNorm(torch.autograd.Function):
    """Forward: a norm's output ``y`` unchanged. Backward: the frozen-statistic input gradient to ``x``
    and the exact weight and bias gradients, in place of the norm's own backward (which is not run).

    For norms that run a fused kernel whose statistic is not a node in the graph (TransformerBridge
    wraps HF's norm module): a replacement of the norm's backward instead of a change to the module.
    The statistics (``[batch, pos, 1]`` each) are computed in forward, right after the norm's own,
    while ``x`` is still in cache. ``map_grad_input`` runs on the input gradient (the hook set runs
    the bypassed ``hook_in``'s backward hooks there).
    """

    @staticmethod
    def forward(ctx, y, x, weight, bias, weight_offset, eps, centered, map_grad_input):
        mean, inv_sigma = norm_stats(x, eps, centered=centered)
        ctx.save_for_backward(x, mean, inv_sigma)
        ctx.settings = (weight, bias, weight_offset, eps, centered, map_grad_input)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        x, mean, inv_sigma = ctx.saved_tensors
        weight, bias, weight_offset, eps, centered, map_grad_input = ctx.settings
        _, need_x, need_w, need_b = ctx.needs_input_grad[:4]
        grad_x = grad_w = grad_b = None
        stats = (mean, inv_sigma)
        if need_x:
            w = None if weight is None else (weight if weight_offset == 0 else weight + weight_offset).float()
            grad_x = frozen_norm_input_grad(grad_y, x, w, eps, centered=centered, stats=stats)
            if map_grad_input is not None:
                grad_x = map_grad_input(grad_x)
        if need_w or need_b:
            gw, gb = norm_param_grads(grad_y, x, eps, centered=centered, stats=stats, need_bias=need_b)
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

    ``weight``/``bias``: the norm's parameters (their gradients are the exact ones); ``weight_offset``
    what the norm adds to the weight (Gemma: 1); ``eps`` and ``centered`` (LayerNorm) define σ.
    """
    return FrozenNorm.apply(y.detach(), x, weight, bias, float(weight_offset), float(eps), centered,
                            map_grad_input)


# Norm freeze where the statistic is a node of the norm's graph (HF's Python RMSNorms): cut it there.


def graph_node(root, path: tuple[int, ...], names: tuple[str, ...]):
    """The autograd node reached from ``root`` by the ``next_functions`` indices ``path``, or None
    unless every node passed on the way has the name in ``names`` (a graph unlike the one expected)."""
    node = root
    for index, name in zip(path, names, strict=True):
        edges = node.next_functions
        node = edges[index][0] if index < len(edges) else None
        if node is None or node.name() != name:
            return None
    return node


def drop_gradient(node, on_backward: Callable[[], None] | None = None):
    """Give autograd ``node`` no gradient: the branch it starts is a constant in backward, as if its
    output had been detached in forward, and its nodes receive nothing to compute.

    On the node where a norm's graph computes its statistic (found by ``layout``), this is the norm
    freeze, with the norm's own backward running for everything else (weight and bias gradients too).
    Returns the hook's handle (``.remove()`` undoes it).
    """

    def drop(grad_outputs: tuple[Tensor, ...]) -> tuple[None, ...]:
        if on_backward is not None:
            on_backward()
        return tuple(None for _ in grad_outputs)

    return node.register_prehook(drop)
