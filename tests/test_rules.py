"""Unit tests of ``gim_tl.rules`` against hand-derived math (no models).

TSG is checked against the softmax Jacobian ``diag(a) − a aᵀ`` at ``a = softmax(S/T)``, built row by row
in float64; the norm freeze against autograd of hand-written norms whose statistic is detached.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from gim_tl import rules

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
    err = (got.double() - want).abs().max().item()
    assert err <= TSG_RTOL * scale, f"max |Δ| = {err:.3e} > {TSG_RTOL} × {scale:.3e}"


MASKS = [pytest.param(-math.inf, id="-inf"), pytest.param(torch.finfo(torch.float32).min, id="finfo.min")]


@pytest.mark.parametrize("mask_value", MASKS)
@pytest.mark.parametrize("source_is_scores", [True, False], ids=["scores", "pattern"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 5.0])
def test_tsg_reference_equals_jacobian(mask_value, source_is_scores, temperature):
    scores, mask, g = masked_rows_case(mask_value)
    source = scores if source_is_scores else pattern_as_models_make_it(scores)
    row_valid = ~mask.all(-1)
    got = rules.tsg_grad_scores_reference(source, g, temperature, source_is_scores=source_is_scores,
                                          row_valid=row_valid)
    want = tsg_row_by_row(scores, mask, g, temperature)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert_tsg_close(got, want)
    assert torch.all(got[~row_valid] == 0), "fully masked rows must get a zero gradient"
    assert torch.all(got[mask] == 0), "masked keys must get a zero gradient"


@pytest.mark.parametrize("mask_value", MASKS)
def test_tsg_from_scores_finds_empty_rows_itself(mask_value):
    """Without ``row_valid``, the scores source detects fully masked rows (any TL mask value)."""
    scores, mask, g = masked_rows_case(mask_value)
    got = rules.tsg_grad_scores_reference(scores, g, 2.0, source_is_scores=True)
    assert_tsg_close(got, tsg_row_by_row(scores, mask, g, 2.0))


@pytest.mark.parametrize("source_is_scores", [True, False], ids=["scores", "pattern"])
def test_tsg_reference_on_non_contiguous_inputs(source_is_scores):
    """A transposed (non-contiguous) source or gradient gives the same dS as contiguous copies."""
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 3, 7, 7, generator=gen).masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), -math.inf)
    source = scores if source_is_scores else scores.softmax(-1)
    grad = torch.randn(2, 3, 7, 7, generator=gen)
    want = rules.tsg_grad_scores_reference(source, grad, 2.0, source_is_scores=source_is_scores)
    src_t = source.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, key dim strided
    grad_t = grad.transpose(1, 2).contiguous().transpose(1, 2)
    assert not src_t.is_contiguous() and not grad_t.is_contiguous()
    got = rules.tsg_grad_scores_reference(src_t, grad_t, 2.0, source_is_scores=source_is_scores)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_tsg_from_zero_pattern_row_is_zero():
    """HookedTransformer's fully masked rows have an all-zero pattern (NaN → 0): zero gradient, no NaN."""
    scores, mask, g = masked_rows_case(-math.inf)
    got = rules.tsg_grad_scores_reference(pattern_as_models_make_it(scores), g, 2.0, source_is_scores=False)
    assert torch.isfinite(got).all()
    assert_tsg_close(got, tsg_row_by_row(scores, mask, g, 2.0))


@pytest.mark.parametrize("mask_value", MASKS)
@pytest.mark.parametrize("keep_scores", [True, False], ids=["scores", "pattern"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.5])
def test_apply_tsg_backward_equals_jacobian(mask_value, keep_scores, temperature):
    scores, mask, g = masked_rows_case(mask_value, seed=1)
    leaf = scores.clone().requires_grad_(True)
    pattern = torch.softmax(leaf, dim=-1)
    pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
    out = rules.apply_tsg(leaf, pattern, temperature, keep_scores=keep_scores, use_triton=False)
    assert torch.equal(out, pattern), "apply_tsg must not change the forward value"
    out.backward(g)
    assert_tsg_close(leaf.grad, tsg_row_by_row(scores, mask, g, temperature))


def test_apply_tsg_maps_gradients_and_keeps_dtype():
    seen = {}
    scores = torch.randn(1, 2, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    out = rules.apply_tsg(scores, torch.softmax(scores.float(), -1).to(scores.dtype), 2.0, use_triton=False,
                          map_grad_pattern=lambda g: seen.setdefault("pattern", 2 * g),
                          map_grad_scores=lambda d: seen.setdefault("scores", -d))
    g = torch.randn(1, 2, 4, 4, dtype=torch.bfloat16)
    out.backward(g)
    assert torch.equal(seen["pattern"], 2 * g) and scores.grad.dtype == torch.bfloat16
    expected = rules.tsg_grad_scores_reference(scores.detach(), 2 * g, 2.0, source_is_scores=True)
    assert torch.equal(seen["scores"], scores.grad) and torch.allclose(scores.grad.float(), -expected, atol=1e-2)


@pytest.mark.parametrize("mask_value", MASKS)
def test_tsg_at_temperature_one_is_plain_softmax_backward(mask_value):
    scores, mask, g = masked_rows_case(mask_value, seed=2)
    keep = ~mask.all(-1)  # plain backward of an all -inf row is NaN: compare the other rows
    plain = scores.clone().requires_grad_(True)
    torch.softmax(plain, -1).backward(g)
    tsg = scores.clone().requires_grad_(True)
    rules.apply_tsg(tsg, torch.softmax(tsg, -1), 1.0, use_triton=False).backward(g)
    torch.testing.assert_close(tsg.grad[keep], plain.grad[keep], rtol=1e-6, atol=1e-6 * g.abs().max().item())


def test_tsg_high_temperature_limit():
    """As T → ∞ a row with n valid keys gets ``(g_j − mean_valid(g)) / n`` (spec §2.1)."""
    scores, mask, g = masked_rows_case(-math.inf, seed=3)
    got = rules.tsg_grad_scores_reference(scores, g, 1e7, source_is_scores=True)
    valid = (~mask).double()
    n = valid.sum(-1, keepdim=True).clamp_min(1)
    mean = (g.double() * valid).sum(-1, keepdim=True) / n
    want = valid * (g.double() - mean) / n
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.7, 2.0, 4.0])
def test_tempered_pattern_equals_softmax_of_scaled_scores(temperature):
    scores, mask, _ = masked_rows_case(torch.finfo(torch.float32).min, seed=4)
    want = torch.softmax(scores.masked_fill(mask, -math.inf).double() / temperature, -1)
    want = torch.nan_to_num(want, nan=0.0)  # fully masked row -> zeros
    from_scores = rules.tempered_pattern(scores, temperature, source_is_scores=True)
    from_pattern = rules.tempered_pattern(torch.nan_to_num(torch.softmax(scores.masked_fill(mask, -math.inf), -1)),
                                          temperature, source_is_scores=False)
    torch.testing.assert_close(from_scores.double(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(from_pattern.double(), want, rtol=0, atol=1e-6)


def test_tempered_pattern_keeps_subnormal_weights_and_exact_zeros():
    """At T = 2 keys whose pattern weight underflowed to a subnormal still carry √a (≈ 3e-21 here), and masked
    keys (a = 0) get exactly 0, never NaN: checked against √a / Σ√a in float64."""
    tiny = torch.finfo(torch.float32).tiny
    pattern = torch.tensor([[0.5, 0.25, tiny / 1e3, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    got = rules.tempered_pattern(pattern, 2.0, source_is_scores=False)
    root = pattern.double().sqrt()
    want = root / root.sum(-1, keepdim=True).clamp_min(1e-300)
    assert not got.isnan().any()
    assert got[0, 2] > 0 and (got[:, 3] == 0).all() and (got[2] == 0).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_masked_below_recognises_tl_mask_values(dtype):
    fmin = torch.finfo(dtype).min
    x = torch.tensor([-math.inf, fmin, fmin + fmin, 0.0, -1e4], dtype=dtype)
    assert rules.masked_below(x).tolist() == [True, True, True, False, False]


# --------------------------------------------------------------------------------------
# Gradient normalization
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [0.25, 0.5, 0.3])
def test_scale_grad_is_identity_forward_and_scales_backward(factor):
    calls = []
    x = torch.randn(3, 5, requires_grad=True)
    y = rules.scale_grad(x, factor, lambda: calls.append(1))
    assert torch.equal(y, x)
    g = torch.randn(3, 5)
    y.backward(g)
    assert torch.equal(x.grad, g * factor) and calls == [1]


def test_freeze_scale_detaches_without_changing_values():
    scale = torch.rand(2, 3, 1, requires_grad=True) + 1
    frozen = rules.freeze_scale(scale)
    assert torch.equal(frozen, scale) and not frozen.requires_grad


# --------------------------------------------------------------------------------------
# Norm freeze: the backward that replaces an exact norm's by the frozen-statistic one, or a cut
# of the statistic's node
# --------------------------------------------------------------------------------------


def hand_norm(x, weight, bias, *, centered, gemma, freeze, eps=1e-5):
    """``w ⊙ (x − μ)/σ + b`` written out (μ = 0 and σ = rms for RMSNorm); ``freeze`` detaches σ."""
    xc = x - x.mean(-1, keepdim=True) if centered else x
    sigma = (xc.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    if freeze:
        sigma = sigma.detach()
    w = 1 + weight if gemma else weight
    y = w * (xc / sigma)
    return y if bias is None else y + bias, sigma


NORMS = [
    pytest.param(dict(centered=False, gemma=False, bias=False), id="rmsnorm"),
    pytest.param(dict(centered=False, gemma=True, bias=False), id="gemma-rmsnorm"),
    pytest.param(dict(centered=True, gemma=False, bias=True), id="layernorm-bias"),
]


@pytest.mark.parametrize("kind", NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_norm_freeze_replaces_the_backward_by_the_frozen_one(kind, dtype):
    """``apply_norm_freeze`` on a norm's output: the input gradient is that of the same norm with σ
    detached, the weight and bias gradients the exact ones (hand-written norm, autograd), in the
    model's dtype; the norm's own backward is not run, and ``map_grad_input`` sees the input gradient."""
    gen = torch.Generator().manual_seed(5)
    x = (3 * torch.randn(2, 4, 16, generator=gen) + 0.5).to(dtype)
    weight = torch.randn(16, generator=gen).to(dtype).requires_grad_(True)
    bias = torch.randn(16, generator=gen).to(dtype).requires_grad_(True) if kind["bias"] else None
    g = torch.randn(2, 4, 16, generator=gen).to(dtype)

    want = {}
    for freeze in (False, True):
        xi = x.float().clone().requires_grad_(True)
        w32 = weight.detach().float().requires_grad_(True)
        b32 = None if bias is None else bias.detach().float().requires_grad_(True)
        y, _ = hand_norm(xi, w32, b32, centered=kind["centered"], gemma=kind["gemma"], freeze=freeze)
        y.backward(g.float())
        want[freeze] = (xi.grad, w32.grad, None if b32 is None else b32.grad)

    xi = x.clone().requires_grad_(True)
    y, _ = hand_norm(xi, weight, bias, centered=kind["centered"], gemma=kind["gemma"], freeze=False)
    y.register_hook(lambda grad: pytest.fail("the norm's own backward must not run"))
    seen = []
    frozen = rules.apply_norm_freeze(y, xi, weight, bias, weight_offset=1.0 if kind["gemma"] else 0.0, eps=1e-5,
                                     centered=kind["centered"], map_grad_input=lambda d: seen.append(d) or 2 * d)
    assert torch.equal(frozen, y)
    frozen.backward(g)
    assert xi.grad.dtype == dtype and len(seen) == 1
    scale = want[True][0].abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(seen[0].float(), want[True][0], rtol=tol, atol=tol * scale)
    torch.testing.assert_close(xi.grad.float(), 2 * want[True][0], rtol=tol, atol=2 * tol * scale)
    assert (want[True][0] - want[False][0]).abs().max() > 1e-2 * scale, "freeze must matter in this example"
    for got, exact in ((weight.grad, want[False][1]), (None if bias is None else bias.grad, want[False][2])):
        if exact is not None:
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), exact, rtol=tol, atol=tol * exact.abs().max().item())


@pytest.mark.parametrize("kind", NORMS)
def test_dropping_the_statistic_nodes_gradient_is_detaching_it(kind):
    """``drop_gradient`` on the node that computes σ: input gradient as with σ detached in forward, weight
    and bias gradients the exact ones; the callback runs once per backward; removing the hook restores plain."""
    gen = torch.Generator().manual_seed(6)
    x = 3 * torch.randn(2, 4, 16, generator=gen) + 0.5
    weight, bias = torch.randn(16, generator=gen), torch.randn(16, generator=gen) if kind["bias"] else None
    g = torch.randn(2, 4, 16, generator=gen)

    def grads(freeze: bool, cut: bool):
        xi = x.clone().requires_grad_(True)
        params = [p.clone().requires_grad_(True) for p in (weight, bias) if p is not None]
        y, sigma = hand_norm(xi, params[0], params[1] if len(params) > 1 else None, centered=kind["centered"],
                             gemma=kind["gemma"], freeze=freeze)
        calls = []
        handle = rules.drop_gradient(sigma.grad_fn, lambda: calls.append(1)) if cut else None
        y.backward(g)
        return [xi.grad] + [p.grad for p in params], calls, handle

    (got, calls, handle), (frozen, _, _), (plain, _, _) = grads(False, True), grads(True, False), grads(False, False)
    assert calls == [1] and handle is not None
    torch.testing.assert_close(got[0], frozen[0], rtol=1e-6, atol=1e-6)
    assert (frozen[0] - plain[0]).abs().max() > 1e-2, "freeze must matter in this example"
    for a, b in zip(got[1:], plain[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

    xi = x.clone().requires_grad_(True)
    y, sigma = hand_norm(xi, weight, bias, centered=kind["centered"], gemma=kind["gemma"], freeze=False)
    rules.drop_gradient(sigma.grad_fn).remove()
    y.backward(g)
    torch.testing.assert_close(xi.grad, plain[0], rtol=0, atol=0)


def test_graph_node_follows_the_path_only_through_the_named_nodes():
    """``graph_node`` walks ``next_functions`` indices, and answers None where a name or an index does not fit."""
    x = torch.randn(3, requires_grad=True)
    scaled = x * 2
    y = scaled.exp() + x.sin()
    assert rules.graph_node(y.grad_fn, (0, 0), ("ExpBackward0", "MulBackward0")) is scaled.grad_fn
    assert rules.graph_node(y.grad_fn, (), ()) is y.grad_fn
    assert rules.graph_node(y.grad_fn, (1,), ("ExpBackward0",)) is None  # index 1 is sin's node
    assert rules.graph_node(y.grad_fn, (0, 5), ("ExpBackward0", "MulBackward0")) is None
    leaf = rules.graph_node(y.grad_fn, (0, 0, 0), ("ExpBackward0", "MulBackward0", "torch::autograd::AccumulateGrad"))
    assert leaf is not None and leaf.variable is x


def test_scaling_the_products_node_scales_both_factors_and_nothing_else():
    """On the node of ``act(gate) · up (+ b)``, ×s gives gate and up exactly s × their plain gradients
    (hand-derived: ``g · up · act'(gate)`` and ``g · act(gate)``), while ``b`` and a hook on the product's
    own tensor see the gradient unscaled. ``product_node`` steps over a backward-hook wrapper and answers
    None for another graph."""
    gen = torch.Generator().manual_seed(3)
    gate, up, b = (torch.randn(2, 5, generator=gen).requires_grad_(True) for _ in range(3))
    g = torch.randn(2, 5, generator=gen)
    for with_bias in (False, True):
        post = torch.nn.functional.silu(gate) * up
        if with_bias:
            post = post + b
        names = ("AddBackward0", "MulBackward0") if with_bias else ("MulBackward0",)
        wrapped = torch.nn.Module()
        wrapped.register_full_backward_hook(lambda module, gin, gout: None)
        wrapped.forward = lambda t: t
        post = wrapped(post)  # TL's backward-hook wrapper, as on a HookPoint with a backward hook
        assert post.grad_fn.name() == "BackwardHookFunctionBackward"
        seen = []
        post.register_hook(seen.append)
        fired: list[int] = []
        node = rules.product_node(post, names)
        assert node is not None and node.name() == "MulBackward0"
        rules.scale_node_grad(node, 0.25, functools.partial(fired.append, 1))
        dgate, dup, db = torch.autograd.grad(post, (gate, up, b), g, allow_unused=True)
        sig = torch.sigmoid(gate.detach())
        act_grad = sig * (1 + gate.detach() * (1 - sig))
        torch.testing.assert_close(dgate, 0.25 * g * up.detach() * act_grad)
        torch.testing.assert_close(dup, 0.25 * g * torch.nn.functional.silu(gate.detach()))
        assert (db is None) != with_bias and (not with_bias or torch.equal(db, g))
        assert torch.equal(seen[0], g) and fired == [1]
    assert rules.product_node(gate.exp() + up, ("MulBackward0",)) is None
    assert rules.product_node(gate.exp() + up, ("AddBackward0", "MulBackward0")) is None


def test_frozen_norm_input_grad_uses_eps():
    """Where ε dominates the variance, σ must include it: checked at ε = 1e-2 and 1e-6."""
    gen = torch.Generator().manual_seed(1)
    x = 0.05 * torch.randn(3, 8, generator=gen)
    g = torch.randn(3, 8, generator=gen)
    for eps in (1e-2, 1e-6):
        xi = x.clone().requires_grad_(True)
        y, _ = hand_norm(xi, torch.ones(8), None, centered=False, gemma=False, freeze=True, eps=eps)
        y.backward(g)
        got = rules.frozen_norm_input_grad(g, x, None, eps, centered=False)
        torch.testing.assert_close(got, xi.grad, rtol=1e-5, atol=1e-5 * xi.grad.abs().max().item())


def test_scale_grad_scales_every_use_and_capture_grad_reads_the_total():
    x = torch.randn(4, requires_grad=True)
    seen = []
    h = 3 * x
    assert rules.scale_grad(h, 0.5) is h
    rules.capture_grad(h, seen.append)  # registered after the scale: sees the scaled total
    g1, g2 = torch.randn(4), torch.randn(4)
    (h * g1 + h.exp() * g2).sum().backward()
    total = g1 + h.detach().exp() * g2
    torch.testing.assert_close(seen[0], 0.5 * total)
    torch.testing.assert_close(x.grad, 3 * 0.5 * total)
