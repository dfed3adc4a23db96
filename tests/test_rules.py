"""The GIM rules (``gim_tl.rules``) against independent references, and each fast form of a rule
(``gim_tl.fast``) against the rule it computes. No models.

References: the softmax Jacobian ``diag(a) − a aᵀ`` at ``a = softmax(S/T)`` built row by row in float64 and
``reference_gim.tsg_by_jacobian``; the reference's hand-written norms with ``.detach()``ed statistics and its
``x.detach() + s · (x − x.detach())`` gradient scaling; hand-derived derivatives.
"""

from __future__ import annotations

import functools
import math

import pytest
import reference_gim as ref
import torch

from gim_tl import fast, rules
from gim_tl.config import GIMConfig
from gim_tl.masks import fully_masked_rows, masked_below

pytestmark = pytest.mark.usefixtures("single_thread")

#: fp32 TSG tolerance, relative to the largest gradient entry (observed errors are ~1e-7 of it).
TSG_RTOL = 2e-6


def masked_rows_case(mask_value: float, seed: int = 0, dtype=torch.float32):
    """Scores ``[2, 3, 6, 6]``: causal mask, random extra masked keys, one fully masked and one single-key row."""
    g = torch.Generator().manual_seed(seed)
    scores = 4 * torch.randn(2, 3, 6, 6, generator=g)
    mask = torch.ones(6, 6, dtype=torch.bool).triu(1).expand(2, 3, 6, 6).clone()
    mask |= torch.rand(2, 3, 6, 6, generator=g) < 0.25
    mask[..., 0] = False  # every row keeps key 0 ...
    mask[0, 0, 2, :] = True  # ... except a fully masked row
    mask[1, 2, 4, :] = True
    mask[1, 2, 4, 3] = False  # a single-key row
    fill = torch.tensor(mask_value, dtype=dtype)
    scores = scores.to(dtype).masked_fill(mask, fill)
    grad_pattern = torch.randn(2, 3, 6, 6, generator=g)
    return scores, mask, grad_pattern


def tsg_row_by_row(scores, mask, grad_pattern, temperature):
    """``dS = J(softmax(S/T)) g`` per row in float64 over the valid keys; 0 elsewhere and on empty rows."""
    n_keys = scores.shape[-1]
    rows_s, rows_m, rows_g = scores.reshape(-1, n_keys), mask.reshape(-1, n_keys), grad_pattern.reshape(-1, n_keys)
    out = torch.zeros(rows_s.shape, dtype=torch.float64)
    for r in range(rows_s.shape[0]):
        valid = ~rows_m[r]
        if not valid.any():
            continue
        a = torch.softmax(rows_s[r][valid].double() / temperature, dim=0)
        jac = torch.diag(a) - torch.outer(a, a)
        out[r, valid] = jac @ rows_g[r][valid].double()
    return out.reshape(scores.shape)


def pattern_as_models_make_it(scores):
    """What TL puts at ``hook_pattern``: softmax, with HookedTransformer's NaN → 0 for ``-inf`` rows."""
    p = torch.softmax(scores.float(), dim=-1)
    return torch.where(torch.isnan(p), torch.zeros_like(p), p)


def assert_tsg_close(got, want):
    scale = want.abs().max().item()
    err = (got.double() - want.double()).abs().max().item()
    assert err <= TSG_RTOL * scale, f"max |Δ| = {err:.3e} > {TSG_RTOL} × {scale:.3e}"


def tsg_rule(scores, grad_pattern, temperature):
    """The readable TSG rule on scores: ``tsg_grad(tempered_softmax(S, T), g)``."""
    return rules.tsg_grad(rules.tempered_softmax(scores, temperature), grad_pattern)


MASKS = [pytest.param(-math.inf, id="-inf"), pytest.param(torch.finfo(torch.float32).min, id="finfo.min")]


# ======================================================================================
# Part 1. Each rule against an independent reference
# ======================================================================================

# ---- TSG ------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_value", MASKS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 5.0])
def test_tsg_rule_equals_the_jacobian_row_by_row(mask_value, temperature):
    scores, mask, g = masked_rows_case(mask_value)
    got = tsg_rule(scores, g, temperature)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert_tsg_close(got, tsg_row_by_row(scores, mask, g, temperature))
    assert_tsg_close(got, ref.tsg_by_jacobian(scores, g, temperature))
    assert torch.all(got[mask] == 0), "masked keys (and fully masked rows) must get a zero gradient"


@pytest.mark.parametrize("mask_value", MASKS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.5])
def test_tsg_softmax_is_softmax_forward_and_tsg_backward(mask_value, temperature):
    """The rule as an autograd Function: forward the model's softmax bit for bit (an all ``-inf`` row 0, not
    NaN), backward the Jacobian at softmax(S/T) with no 1/T (0 on fully masked rows, whatever their mask)."""
    scores, mask, g = masked_rows_case(mask_value, seed=1)
    leaf = scores.clone().requires_grad_(True)
    out = rules.tsg_softmax(leaf, temperature)
    assert torch.equal(out, torch.softmax(scores, -1).nan_to_num(0.0))
    out.backward(g)
    assert_tsg_close(leaf.grad, tsg_row_by_row(scores, mask, g, temperature))


@pytest.mark.parametrize("mask_value", MASKS)
def test_tsg_at_temperature_one_is_the_plain_softmax_backward(mask_value):
    scores, mask, g = masked_rows_case(mask_value, seed=2)
    keep = ~mask.all(-1)  # plain backward of an all -inf row is NaN: compare the other rows
    plain = scores.clone().requires_grad_(True)
    torch.softmax(plain, -1).backward(g)
    tsg = scores.clone().requires_grad_(True)
    rules.tsg_softmax(tsg, 1.0).backward(g)
    torch.testing.assert_close(tsg.grad[keep], plain.grad[keep], rtol=1e-6, atol=1e-6 * g.abs().max().item())


@pytest.mark.parametrize("temperature", [0.7, 2.0, 4.0])
def test_tsg_is_temperature_times_the_gradient_of_a_tempered_softmax(temperature):
    """No 1/T factor: TSG = T · ∂/∂S ⟨softmax(S/T), g⟩ (autograd in float64), on rows with a valid key."""
    scores, mask, g = masked_rows_case(-math.inf, seed=5)
    s64 = scores.double().requires_grad_(True)
    (torch.softmax(s64 / temperature, -1).nan_to_num(0.0) * g.double()).sum().backward()
    rows = ~mask.all(-1)
    assert_tsg_close(tsg_rule(scores, g, temperature)[rows], temperature * s64.grad[rows])


def test_tsg_high_temperature_limit():
    """As T → ∞ a row with n valid keys gets ``(g_j − mean_valid(g)) / n``."""
    scores, mask, g = masked_rows_case(-math.inf, seed=3)
    got = tsg_rule(scores, g, 1e7)
    valid = (~mask).double()
    n = valid.sum(-1, keepdim=True).clamp_min(1)
    mean = (g.double() * valid).sum(-1, keepdim=True) / n
    want = valid * (g.double() - mean) / n
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mask_value", MASKS)
def test_tsg_rows_sum_to_zero(mask_value):
    """Σ_j dS_j = 0: TSG keeps the softmax's shift invariance."""
    scores, _, g = masked_rows_case(mask_value, seed=6)
    got = tsg_rule(scores, g, 2.0)
    assert got.sum(-1).abs().max() <= 1e-6 * got.abs().max()


@pytest.mark.parametrize("temperature", [0.7, 2.0, 4.0])
def test_tempered_softmax_equals_softmax_of_scaled_scores(temperature):
    scores, mask, _ = masked_rows_case(torch.finfo(torch.float32).min, seed=4)
    want = torch.softmax(scores.masked_fill(mask, -math.inf).double() / temperature, -1).nan_to_num(0.0)
    torch.testing.assert_close(rules.tempered_softmax(scores, temperature).double(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_masked_below_recognises_tl_mask_values(dtype):
    fmin = torch.finfo(dtype).min
    x = torch.tensor([-math.inf, fmin, fmin + fmin, 0.0, -1e4], dtype=dtype)
    assert masked_below(x).tolist() == [True, True, True, False, False]


def test_fully_masked_rows_finds_left_padding_rows_only():
    scores, mask, _ = masked_rows_case(-math.inf)
    got = fully_masked_rows(scores)
    assert got is not None and torch.equal(got, mask.all(-1))
    causal = torch.zeros(2, 5, 5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), -math.inf)
    assert fully_masked_rows(causal) is None


# ---- Norm freeze ----------------------------------------------------------------------


NORMS = [
    pytest.param(dict(centered=False, gemma=False, bias=False), id="rmsnorm"),
    pytest.param(dict(centered=False, gemma=True, bias=False), id="gemma-rmsnorm"),
    pytest.param(dict(centered=True, gemma=False, bias=True), id="layernorm-bias"),
]


def norm_case(kind, seed=5, d=16):
    gen = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(2, 4, d, generator=gen) + 0.5
    weight = torch.randn(d, generator=gen)
    bias = torch.randn(d, generator=gen) if kind["bias"] else None
    return x, weight, bias, torch.randn(2, 4, d, generator=gen)


def reference_norm(x, weight, bias, kind, *, freeze, eps=1e-5):
    """The reference's hand-written norm (σ detached when ``freeze``): RMSNorm with Gemma's ``1 + w``, or LayerNorm."""
    if kind["centered"]:
        return ref.layer_norm(x, weight, bias, eps, freeze=freeze)
    return ref.rms_norm(x, weight, eps, freeze=freeze, offset=1.0 if kind["gemma"] else 0.0)


def grads_of(fn, *tensors, grad_out):
    """Gradients of ``⟨fn(*leaves), grad_out⟩`` for fresh leaf copies of ``tensors`` (None stays None)."""
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("kind", NORMS)
def test_frozen_norm_equals_the_reference_norm_with_its_statistic_detached(kind):
    """Same value as the exact norm; input gradient of the reference's frozen norm, which differs from the
    exact one; weight and bias gradients the exact ones."""
    x, w, b, g = norm_case(kind)
    offset = 1.0 if kind["gemma"] else 0.0
    got_y, got = grads_of(lambda x, w, b: rules.frozen_norm(x, w + offset, b, 1e-5, centered=kind["centered"]),
                          x, w, b, grad_out=g)
    frozen_y, frozen = grads_of(lambda x, w, b: reference_norm(x, w, b, kind, freeze=True), x, w, b, grad_out=g)
    exact_y, exact = grads_of(lambda x, w, b: reference_norm(x, w, b, kind, freeze=False), x, w, b, grad_out=g)
    torch.testing.assert_close(got_y, exact_y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[0], frozen[0], rtol=1e-5, atol=1e-6)
    assert (frozen[0] - exact[0]).abs().max() > 1e-2 * frozen[0].abs().max(), "freeze must matter in this example"
    for a, e in zip(got[1:], exact[1:], strict=True):
        assert (a is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", NORMS)
def test_frozen_norm_input_grad_is_the_closed_form_of_its_backward(kind):
    """``(I − 11ᵀ/d)(g ⊙ w)/σ`` written out with an explicit d × d matrix, against autograd of ``frozen_norm``."""
    x, w, b, g = norm_case(kind, seed=7)
    centered = kind["centered"]
    got = rules.frozen_norm_input_grad(g, x, w, 1e-5, centered=centered)
    _, (autograd, *_) = grads_of(lambda x: rules.frozen_norm(x, w, b, 1e-5, centered=centered), x, grad_out=g)
    d = x.shape[-1]
    xd = x.double()
    xc = xd - xd.mean(-1, keepdim=True) if centered else xd
    sigma = (xc.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    project = torch.eye(d, dtype=torch.float64) - (torch.ones(d, d, dtype=torch.float64) / d if centered else 0)
    want = (g.double() * w.double() / sigma) @ project.T
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(autograd, got, rtol=1e-5, atol=1e-6)


def test_frozen_norm_input_grad_uses_eps():
    """Where ε dominates the variance, σ must include it: checked at ε = 1e-2 and 1e-6."""
    gen = torch.Generator().manual_seed(1)
    x = 0.05 * torch.randn(3, 8, generator=gen)
    g = torch.randn(3, 8, generator=gen)
    for eps in (1e-2, 1e-6):
        _, (want, *_) = grads_of(lambda x, eps=eps: ref.rms_norm(x, None, eps, freeze=True), x, grad_out=g)
        got = rules.frozen_norm_input_grad(g, x, None, eps, centered=False)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


# ---- Gradient normalization -----------------------------------------------------------


@pytest.mark.parametrize("factor", [0.25, 0.5, 0.3])
def test_scale_grad_equals_the_reference_trick(factor):
    """Identity forward, ``factor ×`` backward: as ``x.detach() + s (x − x.detach())``, through a nonlinearity."""
    x = torch.randn(3, 5)
    g = torch.randn(3, 5)
    got_y, (got,) = grads_of(lambda x: rules.scale_grad(x, factor).sin(), x, grad_out=g)
    want_y, (want,) = grads_of(lambda x: ref.grad_times(x, factor).sin(), x, grad_out=g)
    assert torch.equal(got_y, want_y)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got, factor * g * x.cos(), rtol=1e-6, atol=1e-7)


def test_grad_norm_factors_are_the_configs_and_the_references_defaults():
    """One factor per branch of a two-way product (½), twice over for q and k (¼)."""
    cfg, rf = GIMConfig(), ref.Rules()
    assert rules.GRAD_NORM_FACTORS == {"v": 0.5, "q": 0.25, "k": 0.25, "gate": 0.5, "up": 0.5}
    for name, factor in rules.GRAD_NORM_FACTORS.items():
        assert getattr(cfg, f"{name}_scale") == factor == getattr(rf, name)


# ======================================================================================
# Part 2. Each fast form (gim_tl.fast) against the rule it computes
# ======================================================================================


@pytest.mark.parametrize("mask_value", MASKS)
@pytest.mark.parametrize("temperature", [0.7, 2.0, 3.5])
def test_tempered_pattern_from_scores_or_pattern_equals_the_rule(mask_value, temperature):
    """``A^(1/T) / Σ A^(1/T)`` from the pattern (√ as 1/rsqrt at T = 2) and the in-place form from the
    scores both equal ``tempered_softmax``."""
    scores, mask, _ = masked_rows_case(mask_value, seed=4)
    want = rules.tempered_softmax(scores, temperature)
    from_scores = fast.tempered_pattern(scores, temperature, source_is_scores=True)
    pattern = pattern_as_models_make_it(scores.masked_fill(mask, -math.inf))
    from_pattern = fast.tempered_pattern(pattern, temperature, source_is_scores=False)
    torch.testing.assert_close(from_scores, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(from_pattern, want, rtol=0, atol=1e-6)
    keep = ~mask.all(-1)
    nonempty = fast.tempered_pattern(pattern[keep], temperature, source_is_scores=False, nonempty=True)
    torch.testing.assert_close(nonempty, want[keep], rtol=0, atol=1e-6)


def test_tempered_pattern_keeps_subnormal_weights_and_exact_zeros():
    """At T = 2 keys whose pattern weight underflowed to a subnormal still carry √a (≈ 3e-21 here), and masked
    keys (a = 0) get exactly 0, never NaN: checked against √a / Σ√a in float64."""
    tiny = torch.finfo(torch.float32).tiny
    pattern = torch.tensor([[0.5, 0.25, tiny / 1e3, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    got = fast.tempered_pattern(pattern, 2.0, source_is_scores=False)
    root = pattern.double().sqrt()
    want = root / root.sum(-1, keepdim=True).clamp_min(1e-300)
    assert not got.isnan().any()
    assert got[0, 2] > 0 and (got[:, 3] == 0).all() and (got[2] == 0).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("mask_value", MASKS)
@pytest.mark.parametrize("source_is_scores", [True, False], ids=["scores", "pattern"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 5.0])
def test_fused_softmax_backward_path_equals_the_rule(mask_value, source_is_scores, temperature):
    """``tsg_grad_scores_torch`` (PyTorch's fused softmax backward over A_T) equals ``tsg_grad``; with
    ``row_valid``, a bridge's fully masked row (uniform pattern) gets 0 too."""
    scores, mask, g = masked_rows_case(mask_value)
    source = scores if source_is_scores else pattern_as_models_make_it(scores)
    row_valid = ~mask.all(-1)
    got = fast.tsg_grad_scores_torch(source, g, temperature, source_is_scores=source_is_scores, row_valid=row_valid)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert_tsg_close(got, tsg_rule(scores, g, temperature))
    assert torch.all(got[mask] == 0) and torch.all(got[~row_valid] == 0)


@pytest.mark.parametrize("source_is_scores", [True, False], ids=["scores", "pattern"])
def test_fused_softmax_backward_path_on_non_contiguous_inputs(source_is_scores):
    """A transposed (non-contiguous) source or gradient: no in-place write over a strided A_T, same dS."""
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 3, 7, 7, generator=gen).masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), -math.inf)
    source = scores if source_is_scores else scores.softmax(-1)
    grad = torch.randn(2, 3, 7, 7, generator=gen)
    src_t = source.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, key dim strided
    grad_t = grad.transpose(1, 2).contiguous().transpose(1, 2)
    assert not src_t.is_contiguous() and not grad_t.is_contiguous()
    got = fast.tsg_grad_scores_torch(src_t, grad_t, 2.0, source_is_scores=source_is_scores)
    assert_tsg_close(got, tsg_rule(scores, grad, 2.0))


@pytest.mark.parametrize("mask_value", MASKS)
@pytest.mark.parametrize("keep_scores", [True, False], ids=["scores", "pattern"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.5])
def test_apply_tsg_equals_tsg_softmax(mask_value, keep_scores, temperature):
    """The bypass Function at ``hook_pattern``: the pattern's values unchanged, the gradient reaching the scores
    that of ``rules.tsg_softmax`` (the model's softmax node is bypassed, so it must not run)."""
    scores, _, g = masked_rows_case(mask_value, seed=1)
    want_leaf = scores.clone().requires_grad_(True)
    rules.tsg_softmax(want_leaf, temperature).backward(g)
    leaf = scores.clone().requires_grad_(True)
    pattern = pattern_as_models_make_it(leaf)
    pattern.register_hook(lambda grad: pytest.fail("the model's own softmax backward must not run"))
    out = fast.apply_tsg(leaf, pattern, temperature, keep_scores=keep_scores, use_triton=False)
    assert torch.equal(out, pattern)
    out.backward(g)
    assert_tsg_close(leaf.grad, want_leaf.grad)


def test_apply_tsg_maps_gradients_and_keeps_dtype():
    """``map_grad_pattern`` acts on ∂L/∂A before the rule, ``map_grad_scores`` on ∂L/∂S after it; bf16 in, bf16 out."""
    seen = {}
    scores = torch.randn(1, 2, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    out = fast.apply_tsg(scores, torch.softmax(scores.float(), -1).to(scores.dtype), 2.0, use_triton=False,
                         map_grad_pattern=lambda g: seen.setdefault("pattern", 2 * g),
                         map_grad_scores=lambda d: seen.setdefault("scores", -d))
    g = torch.randn(1, 2, 4, 4, dtype=torch.bfloat16)
    out.backward(g)
    assert torch.equal(seen["pattern"], 2 * g) and scores.grad.dtype == torch.bfloat16
    want = tsg_rule(scores.detach(), 2 * g, 2.0)
    assert torch.equal(seen["scores"], scores.grad)
    torch.testing.assert_close(scores.grad.float(), -want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_one_factor_on_the_score_gradient_is_the_q_and_k_factors():
    """``S = q kᵀ · c`` is bilinear: ×s on dS gives q and k exactly what ×s on each of them gives
    (the single ¼ that TSG's backward applies when the q and k factors are equal)."""
    gen = torch.Generator().manual_seed(8)
    q, k = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    g = torch.randn(2, 5, 5, generator=gen)
    s = 0.25

    def scores_scaled_on_branches(q, k):
        return rules.scale_grad(q, s) @ rules.scale_grad(k, s).transpose(-1, -2) * 8 ** -0.5

    def scores_scaled_once(q, k):
        return rules.scale_grad(q @ k.transpose(-1, -2) * 8 ** -0.5, s)

    _, want = grads_of(scores_scaled_on_branches, q, k, grad_out=g)
    _, got = grads_of(scores_scaled_once, q, k, grad_out=g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("factor", [0.25, 0.5, 0.3])
def test_scale_grad_by_hook_equals_the_rule(factor):
    """The gradient hook on the activation itself: same as ``rules.scale_grad``, on every use of it, and the
    callback runs once per backward."""
    x, g = torch.randn(4), torch.randn(4)
    calls = []

    def two_uses(fn):
        def f(x):
            h = fn(3 * x)
            return h * g + h.exp()
        return f

    _, (want,) = grads_of(two_uses(lambda h: rules.scale_grad(h, factor)), x, grad_out=torch.ones(4))
    _, (got,) = grads_of(two_uses(lambda h: fast.scale_grad_by_hook(h, factor, lambda: calls.append(1))), x,
                         grad_out=torch.ones(4))
    assert torch.equal(got, want) and calls == [1]


def test_scaling_the_products_node_is_the_gate_and_up_factors():
    """×s on the node of ``act(gate) · up (+ b)`` gives gate and up what ``rules.scale_grad(·, s)`` on each
    gives (and s × their plain gradients, derived by hand: ``g · up · act'(gate)`` and ``g · act(gate)``), while
    ``b`` and a hook on the product's own tensor see the gradient unscaled."""
    gen = torch.Generator().manual_seed(3)
    gate, up, b = (torch.randn(2, 5, generator=gen) for _ in range(3))
    g = torch.randn(2, 5, generator=gen)
    silu = torch.nn.functional.silu
    for with_bias in (False, True):
        def by_rule(gate, up, b, with_bias=with_bias):
            return silu(rules.scale_grad(gate, 0.25)) * rules.scale_grad(up, 0.25) + (b if with_bias else 0)

        _, want = grads_of(by_rule, gate, up, b, grad_out=g)
        leaves = [t.clone().requires_grad_(True) for t in (gate, up, b)]
        post = silu(leaves[0]) * leaves[1]
        if with_bias:
            post = post + leaves[2]
        names = ("AddBackward0", "MulBackward0") if with_bias else ("MulBackward0",)
        node = post.grad_fn if not with_bias else post.grad_fn.next_functions[0][0]
        assert node.name() == names[-1]
        seen, fired = [], []
        post.register_hook(seen.append)
        fast.scale_node_grad(node, 0.25, functools.partial(fired.append, 1))
        post.backward(g)
        got = [t.grad for t in leaves]
        for a, e in zip(got[:2], want[:2], strict=True):
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
        sig = torch.sigmoid(gate)
        torch.testing.assert_close(got[0], 0.25 * g * up * sig * (1 + gate * (1 - sig)))
        torch.testing.assert_close(got[1], 0.25 * g * silu(gate))
        assert (got[2] is None) != with_bias and (not with_bias or torch.equal(got[2], g))
        assert torch.equal(seen[0], g) and fired == [1]


@pytest.mark.parametrize("kind", NORMS)
def test_dropping_the_statistics_node_is_the_frozen_norm(kind):
    """``drop_gradient`` on the node that computes σ (the reference norm's ``sqrt``): every gradient equals
    ``rules.frozen_norm``'s; the callback runs once per backward; removing the hook restores the exact norm."""
    x, w, b, g = norm_case(kind, seed=6)
    offset = 1.0 if kind["gemma"] else 0.0
    _, want = grads_of(lambda x, w, b: rules.frozen_norm(x, w + offset, b, 1e-5, centered=kind["centered"]),
                       x, w, b, grad_out=g)
    _, exact = grads_of(lambda x, w, b: reference_norm(x, w, b, kind, freeze=False), x, w, b, grad_out=g)
    calls = []

    def cut_norm(remove: bool):
        def norm(x, w, b):
            y = reference_norm(x, w, b, kind, freeze=False)
            node = y.grad_fn
            sigma_node = next(n for _, names, n in _nodes(node) if names[-1] == "SqrtBackward0")
            handle = fast.drop_gradient(sigma_node, lambda: calls.append(1))
            if remove:
                handle.remove()
            return y
        return norm

    _, got = grads_of(cut_norm(False), x, w, b, grad_out=g)
    assert calls == [1]
    for a, e in zip(got, want, strict=True):
        assert (a is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    _, restored = grads_of(cut_norm(True), x, w, b, grad_out=g)
    assert torch.equal(restored[0], exact[0]) and calls == [1]


def _nodes(root):
    from gim_tl._internals import graph_nodes

    return graph_nodes(root)


@pytest.mark.parametrize("kind", NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_replacing_the_norms_backward_is_the_frozen_norm(kind, dtype):
    """``apply_norm_freeze`` on a norm's output: the input, weight and bias gradients are
    ``rules.frozen_norm``'s, in the model's dtype; the norm's own backward is not run, and ``map_grad_input``
    sees the input gradient."""
    x, w, b, g = norm_case(kind)
    offset = 1.0 if kind["gemma"] else 0.0
    _, want = grads_of(lambda x, w, b: rules.frozen_norm(x, w + offset, b, 1e-5, centered=kind["centered"]),
                       x, w, b, grad_out=g)
    x, w, g = x.to(dtype), w.to(dtype).requires_grad_(True), g.to(dtype)
    b = None if b is None else b.to(dtype).requires_grad_(True)
    xi = x.clone().requires_grad_(True)
    y = reference_norm(xi, w, b, kind, freeze=False).to(dtype)
    y.register_hook(lambda grad: pytest.fail("the norm's own backward must not run"))
    seen = []
    frozen = fast.apply_norm_freeze(y, xi, w, b, weight_offset=offset, eps=1e-5, centered=kind["centered"],
                                    map_grad_input=lambda d: seen.append(d) or 2 * d)
    assert torch.equal(frozen, y)
    frozen.backward(g)
    assert xi.grad.dtype == dtype and len(seen) == 1
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    scale = want[0].abs().max().item()
    torch.testing.assert_close(seen[0].float(), want[0], rtol=tol, atol=tol * scale)
    torch.testing.assert_close(xi.grad.float(), 2 * want[0], rtol=tol, atol=2 * tol * scale)
    for got, exact in ((w.grad, want[1]), (None if b is None else b.grad, want[2])):
        if exact is not None:
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), exact, rtol=tol, atol=tol * exact.abs().max().item())


@pytest.mark.parametrize("kind", NORMS)
def test_frozen_norm_input_grad_from_stats_equals_the_rule(kind):
    x, w, _, g = norm_case(kind, seed=9)
    stats = fast.norm_stats(x, 1e-5, centered=kind["centered"])
    got = fast.frozen_norm_input_grad_from_stats(g, x, w, stats, centered=kind["centered"])
    want = rules.frozen_norm_input_grad(g, x, w, 1e-5, centered=kind["centered"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
