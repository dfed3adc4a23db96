"""The GIM backward rules, each written once as the formula it is. These functions are the definition.

GIM (Edin et al. 2025, "GIM: Improved Interpretability for Large Language Models", arXiv:2505.17630) changes
three things in a transformer's backward pass and nothing in its forward pass:

1. **TSG, temperature-adjusted softmax gradients.** The attention-softmax Jacobian is evaluated at the
   re-tempered pattern ``A_T = softmax(S / T)`` (T = 2) instead of at ``A = softmax(S)``::

       dS = A_T ⊙ (g − Σ_k A_T,k g_k)          g = ∂L/∂A, one row per query; no 1/T factor

   (:func:`tempered_softmax`, :func:`tsg_grad`, :class:`TSGSoftmax`). At T = 1 it is the plain softmax backward.
2. **Norm freeze.** In every LayerNorm/RMSNorm ``y = w ⊙ (x − μ)/σ + b``, ``σ = √(mean((x − μ)²) + ε)``,
   the statistic σ is a constant in backward (RMSNorm: μ = 0)::

       ∂L/∂x = (I − 11ᵀ/d) (g ⊙ w) / σ          RMSNorm: (g ⊙ w) / σ

   (:func:`frozen_norm`, :func:`frozen_norm_input_grad`). The weight and bias keep their exact gradients.
3. **Gradient normalization.** Where the forward multiplies two activation-dependent factors, each factor
   receives the gradient divided by the number of factors (:data:`GRAD_NORM_FACTORS`, :func:`scale_grad`)::

       v × ½   (z = A · v)      q, k × ¼   (A gets ½ from A · v, then q and k each ½ of S = q · kᵀ)
       gate, up × ½   (a gated MLP's act(gate) ⊙ up)

Everything else (residual adds, W_O, activations, rotary, the unembedding) is plain backprop.
``docs/gim.md`` explains where each rule sits in a TransformerLens model. The hook set runs faster forms of
these rules (:mod:`gim_tl.fast`, :mod:`gim_tl.kernel`), each tested equal to its definition here.
All GIM math runs in fp32.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from gim_tl.masks import masked_below

# --------------------------------------------------------------------------------------
# 1. TSG: temperature-adjusted softmax gradients
# --------------------------------------------------------------------------------------


def tempered_softmax(scores: Float[Tensor, "... key"], temperature: float) -> Float[Tensor, "... key"]:
    """``A_T = softmax(S / T)`` in fp32. Masked keys (``-inf`` or ``finfo.min``) get 0; a row with no
    valid key (left padding) is all 0."""
    logits = (scores.float() / temperature).masked_fill(masked_below(scores), float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def tsg_grad(
    tempered: Float[Tensor, "... key"], grad_pattern: Float[Tensor, "... key"]
) -> Float[Tensor, "... key"]:
    """TSG's score gradient ``dS = A_T ⊙ (g − Σ_k A_T,k g_k)``: the softmax Jacobian ``diag(A_T) − A_T A_Tᵀ``
    applied to ``g = ∂L/∂A``, evaluated at ``A_T`` (:func:`tempered_softmax`) instead of ``A``."""
    g = grad_pattern.float()
    return tempered * (g - (tempered * g).sum(-1, keepdim=True))


class TSGSoftmax(torch.autograd.Function):
    """The attention softmax under TSG. Forward: ``A = softmax(S)`` (an all ``-inf`` row: 0, not NaN).
    Backward: :func:`tsg_grad` at ``A_T = softmax(S / T)``, in the scores' dtype."""

    @staticmethod
    def forward(ctx, scores: Tensor, temperature: float) -> Tensor:
        ctx.save_for_backward(scores)
        ctx.temperature = temperature
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)

    @staticmethod
    def backward(ctx, grad_pattern: Tensor):
        (scores,) = ctx.saved_tensors
        d_scores = tsg_grad(tempered_softmax(scores, ctx.temperature), grad_pattern)
        return d_scores.to(scores.dtype), None


def tsg_softmax(scores: Float[Tensor, "... key"], temperature: float) -> Float[Tensor, "... key"]:
    """``softmax(scores)`` whose backward is TSG's (:class:`TSGSoftmax`)."""
    return TSGSoftmax.apply(scores, float(temperature))


# --------------------------------------------------------------------------------------
# 2. Norm freeze
# --------------------------------------------------------------------------------------


def norm_sigma(x: Float[Tensor, "... d"], eps: float, *, centered: bool) -> Float[Tensor, "... 1"]:
    """The norm statistic ``σ = √(mean((x − μ)²) + ε)`` in fp32; ``centered=False`` (RMSNorm): μ = 0."""
    xf = x.float()
    xc = xf - xf.mean(-1, keepdim=True) if centered else xf
    return (xc.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def frozen_norm(
    x: Float[Tensor, "... d"], weight: Tensor | None, bias: Tensor | None, eps: float, *, centered: bool
) -> Float[Tensor, "... d"]:
    """The norm ``y = w ⊙ (x − μ)/σ + b`` (fp32) with σ a constant in backward: ``σ.detach()``.

    The value is the norm's own; the input gradient becomes :func:`frozen_norm_input_grad`, while μ stays
    differentiable and ``w``, ``b`` keep their exact gradients. ``weight`` is the effective scale (Gemma's
    ``1 + w``); None for none.
    """
    xf = x.float()
    xc = xf - xf.mean(-1, keepdim=True) if centered else xf
    y = xc / norm_sigma(x, eps, centered=centered).detach()
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


def frozen_norm_input_grad(
    grad_out: Float[Tensor, "... d"], x: Float[Tensor, "... d"], weight: Tensor | None, eps: float, *,
    centered: bool,
) -> Float[Tensor, "... d"]:
    """The input gradient of :func:`frozen_norm`: ``(I − 11ᵀ/d)(g ⊙ w)/σ`` (RMSNorm: ``(g ⊙ w)/σ``), fp32."""
    grad = grad_out.float() / norm_sigma(x, eps, centered=centered)
    if weight is not None:
        grad = grad * weight.float()
    return grad - grad.mean(-1, keepdim=True) if centered else grad


# --------------------------------------------------------------------------------------
# 3. Gradient normalization
# --------------------------------------------------------------------------------------

#: The factor on each branch's gradient: 1/2 for each factor of a two-way product, twice for q and k.
GRAD_NORM_FACTORS: dict[str, float] = {
    "v": 1 / 2,  # z = A · v
    "q": 1 / 2 * 1 / 2,  # A gets ½ from A · v, and q gets ½ of that from S = q · kᵀ
    "k": 1 / 2 * 1 / 2,
    "gate": 1 / 2,  # act(gate) ⊙ up
    "up": 1 / 2,
}


class ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor``: ``∂L/∂x ← factor · ∂L/∂y``."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """``x`` whose gradient is multiplied by ``factor`` (:class:`ScaleGrad`), e.g. ``scale_grad(v, ½)``."""
    return ScaleGrad.apply(x, float(factor))
