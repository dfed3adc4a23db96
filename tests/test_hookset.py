"""``GIMHookSet`` on tiny models, against independent references.

References: plain autograd (no hooks), the separately written GIM in ``reference_gim.py`` (its forward is
first checked against the model's logits), hand formulas for TSG and the gradient-normalization factors,
and the same example run alone (padding). Tolerances are relative to the largest reference entry:

* ``REF_RTOL = 2e-5``: model + GIMHookSet vs the fp32 reference, logits and input gradients (observed
  ≤ 3.8e-6 on HookedTransformer, ≤ 4.5e-7 on bridges: summation order and rotary tables differ). Every rule
  moves the reference gradient by ≥ 1.4e-3 on these inputs, and the tests check it moves it by > 10 × REF_RTOL.
* ``TSG_RTOL = 1e-5``: the gradient at ``hook_attn_scores`` vs the float64 Jacobian formula.
* ``T1_RTOL = 2e-6``: TSG at T = 1 vs plain autograd (observed ≤ 8e-7).
* bf16 / fp16 vs fp32 (relative L2 error of the input gradient): 0.08 / 0.02 (observed ≤ 0.031 / 0.005).
"""

from __future__ import annotations

import re
import warnings
from types import SimpleNamespace

import pytest
import reference_gim as ref
import tiny_models as tm
import torch
from conftest import HAS_HOOKED, MODELS, cached_model, fresh_model, needs_hooked, needs_two_gpus
from torch import nn

from gim_tl import GIMHookSet, GIMModelError, GIMRuleError

pytestmark = pytest.mark.usefixtures("single_thread")

REF_RTOL = 2e-5
TSG_RTOL = 1e-5
T1_RTOL = 2e-6
DTYPE_RTOL = {torch.bfloat16: 0.08, torch.float16: 0.02}
SINGLE_RULES = ["plain", "tsg", "freeze_norm", "grad_norm", "gim"]

BATCH, SEQ = 2, 8


def tokens_for_test(seed: int = 0, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(4, tm.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def direction_for_test(shape, seed: int = 1) -> torch.Tensor:
    """A fixed random readout of the logits: the metric ``⟨logits, direction⟩`` touches every position."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def run(model, tokens, gim: GIMHookSet | None = None, *, direction=None, bwd_hooks=(), fwd_hooks=(), **kwargs):
    """Forward + backward of ``⟨logits, direction⟩`` with GIM's hooks (if any), inside one ``model.hooks``.

    Returns ``(logits, grad at hook_embed, {param name: grad})``.
    """
    got = {}

    def keep_embed(grad, hook):
        got["embed"] = grad.detach().clone()

    model.zero_grad(set_to_none=True)
    hooks = (gim.fwd_hooks(model) if gim is not None else []) + list(fwd_hooks)
    with model.hooks(fwd_hooks=hooks, bwd_hooks=[("hook_embed", keep_embed), *bwd_hooks]):
        logits = model(tokens, **kwargs)
        d = direction if direction is not None else direction_for_test(logits.shape)
        (logits.float() * d).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits.detach(), got["embed"], grads


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


_REFERENCE_ARCH: dict = {}


def reference_arch(kind: str, name: str, model) -> ref.Arch:
    """The reference's weights: a fresh same-seed HF model for bridges, the HT's own weights otherwise."""
    key = (kind, name)
    if key not in _REFERENCE_ARCH:
        _REFERENCE_ARCH[key] = ref.from_hf(tm.hf_model(name)) if kind == "bridge" else ref.from_hooked(model)
    return _REFERENCE_ARCH[key]


def is_gated(name: str) -> bool:
    return name in ("llama", "qwen2", "gemma2", "llama_like", "gemma_like", "llama_fold_ln")


GATED_MODELS = [m for m in MODELS if is_gated(m.values[0][1])]


def has_post_norms(name: str) -> bool:
    return name in ("gemma2", "gemma_like")


# --------------------------------------------------------------------------------------
# 1-2. All rules off is plain autograd; TSG at T = 1 is plain backprop
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", MODELS)
def test_plain_preset_is_exactly_autograd(model_id):
    model = cached_model(*model_id)
    tokens = tokens_for_test()
    logits0, embed0, params0 = run(model, tokens)
    logits1, embed1, params1 = run(model, tokens, GIMHookSet.preset("plain"))
    assert torch.equal(logits0, logits1) and torch.equal(embed0, embed1)
    assert params0.keys() == params1.keys() and len(params0) > 0
    assert all(torch.equal(params0[n], params1[n]) for n in params0)


@pytest.mark.parametrize("model_id", MODELS)
def test_tsg_at_temperature_one_is_plain(model_id):
    model = cached_model(*model_id)
    tokens = tokens_for_test()
    _, plain, _ = run(model, tokens)
    _, tsg1, _ = run(model, tokens, GIMHookSet.preset("tsg", temperature=1.0))
    _, tsg2, _ = run(model, tokens, GIMHookSet.preset("tsg"))
    assert max_rel_err(tsg1, plain) <= T1_RTOL
    assert max_rel_err(tsg2, plain) > 100 * T1_RTOL, "T = 2 must differ from plain on this model"


# --------------------------------------------------------------------------------------
# 3. TSG: the gradient a user's backward hook sees at hook_attn_scores
# --------------------------------------------------------------------------------------


def scores_and_grads(model, tokens, gim, **kwargs):
    """Run with read-only user hooks: forward scores, backward grads at hook_pattern and hook_attn_scores."""
    fwd, grads = {}, {}

    def saver(store, name):
        def fn(x, hook):
            store[name] = x.detach().clone()
        return fn

    layers = range(model.cfg.n_layers)
    scores = [f"blocks.{i}.attn.hook_attn_scores" for i in layers]
    patterns = [f"blocks.{i}.attn.hook_pattern" for i in layers]
    _, embed, _ = run(model, tokens, gim, fwd_hooks=[(n, saver(fwd, n)) for n in scores],
                      bwd_hooks=[(n, saver(grads, n)) for n in scores + patterns], **kwargs)
    return fwd, grads, embed


def assert_all_fired(grads: dict, model) -> None:
    missing = [f"blocks.{i}.attn.hook_{p}" for i in range(model.cfg.n_layers) for p in ("attn_scores", "pattern")
               if f"blocks.{i}.attn.hook_{p}" not in grads]
    assert not missing, (
        f"user backward hooks at {missing} never fired under GIM (hookset.py documents the TSG gradient at "
        "hook_attn_scores and dL/dA at hook_pattern)")


@pytest.mark.parametrize("model_id", MODELS)
def test_tsg_gradient_at_scores_hook_equals_jacobian_formula(model_id):
    model = cached_model(*model_id)
    scores, grads, _ = scores_and_grads(model, tokens_for_test(), GIMHookSet.preset("tsg"))
    assert_all_fired(grads, model)
    for i in range(model.cfg.n_layers):
        s = scores[f"blocks.{i}.attn.hook_attn_scores"]
        want = ref.tsg_by_jacobian(s, grads[f"blocks.{i}.attn.hook_pattern"], 2.0)
        assert max_rel_err(grads[f"blocks.{i}.attn.hook_attn_scores"], want) <= TSG_RTOL


# --------------------------------------------------------------------------------------
# 4. Norm freeze on HookedTransformer = a user's forward hook detaching every hook_scale
# --------------------------------------------------------------------------------------


@needs_hooked
@pytest.mark.parametrize("variant", tm.HT_VARIANTS)
def test_hooked_freeze_norm_equals_detaching_hook_scale(variant):
    model = cached_model("hooked", variant)
    tokens = tokens_for_test()
    detach_all = [(lambda name: name.endswith("hook_scale"), lambda s, hook: s.detach())]
    _, want, want_params = run(model, tokens, fwd_hooks=detach_all)
    _, got, got_params = run(model, tokens, GIMHookSet.preset("freeze_norm"))
    _, plain, _ = run(model, tokens)
    assert torch.equal(got, want) and all(torch.equal(got_params[n], want_params[n]) for n in want_params)
    assert max_rel_err(got, plain) > 1e-3


# --------------------------------------------------------------------------------------
# 5. Gradient normalization: exact factors on the last layer's projections
# --------------------------------------------------------------------------------------

_ROLE_PATTERNS = {
    "q": r"(q_proj|attn\.q)\.(weight|bias)$|attn\.[Wb]_Q$",
    "k": r"(k_proj|attn\.k)\.(weight|bias)$|attn\._?[Wb]_K$",
    "v": r"(v_proj|attn\.v)\.(weight|bias)$|attn\._?[Wb]_V$",
    "gate": r"gate_proj\.weight$|mlp\.W_gate$",
    "up": r"up_proj\.weight$|mlp\.W_in$",  # gated models only (TL's gated b_in is added after the product)
    "mlp_in": r"c_fc\.(weight|bias)$|mlp\.[Wb]_in$",  # ungated models only
    "gated_b_in": r"mlp\.b_in$",  # TL's GatedMLP: added after act(gate)·up, so never scaled
}


def last_layer_params(grads: dict, layer: int, role: str) -> dict:
    """Parameter grads of one role (q, k, ...) in ``layer``, by name with bridge wrappers stripped."""
    out = {}
    for name, g in grads.items():
        short = name.replace("._original_component", "")
        if re.search(rf"(^|\.)(layers|h|blocks)\.{layer}\.", short) and re.search(_ROLE_PATTERNS[role], short):
            out[short] = g
    assert out, f"no {role} parameters found in layer {layer} among {sorted(grads)[:6]}..."
    return out


def assert_exact_multiple(got: dict, plain: dict, factor: float) -> None:
    for name in plain:
        assert plain[name].abs().max() > 0, f"{name}: zero plain gradient makes the check vacuous"
        assert torch.equal(got[name], factor * plain[name]), (
            f"{name}: expected exactly {factor} × plain, max |Δ| = {(got[name] - factor * plain[name]).abs().max()}")


@pytest.mark.parametrize("model_id", MODELS)
def test_last_layer_qkv_get_quarter_quarter_half(model_id):
    """With the MLP factors at 1, nothing downstream of the last layer's q/k/v changes: exact ¼, ¼, ½."""
    model = cached_model(*model_id)
    tokens, last = tokens_for_test(), model.cfg.n_layers - 1
    _, _, plain = run(model, tokens)
    _, _, scaled = run(model, tokens, GIMHookSet.preset("grad_norm", gate_scale=1.0, up_scale=1.0))
    for role, factor in (("q", 0.25), ("k", 0.25), ("v", 0.5)):
        assert_exact_multiple(last_layer_params(scaled, last, role), last_layer_params(plain, last, role), factor)


def assert_factors_applied_per_branch(model_id, factors: dict, roles: tuple, sites: tuple) -> None:
    """Grad norm with ``factors``: each role's last-layer gradient is its exact multiple, and the report
    lists each ``(rule, hook point)`` in ``sites`` (e.g. ``("grad_norm.q", "attn.hook_q")``) in every layer."""
    model = cached_model(*model_id)
    tokens, last = tokens_for_test(), model.cfg.n_layers - 1
    _, _, plain = run(model, tokens)
    gim = GIMHookSet.preset("grad_norm", **factors)
    _, _, scaled = run(model, tokens, gim)
    for role, factor in roles:
        assert_exact_multiple(last_layer_params(scaled, last, role), last_layer_params(plain, last, role), factor)
    names = {rule for rule, _ in sites}
    assert {(r.rule, r.site) for r in gim.report() if r.rule in names} == {
        (rule, f"blocks.{i}.{point}") for i in range(model.cfg.n_layers) for rule, point in sites}


@pytest.mark.parametrize("model_id", MODELS)
def test_unequal_q_k_factors_are_applied_per_branch(model_id):
    """q ≠ k factors cannot share the score gradient: each goes on its own hook point, still exact."""
    assert_factors_applied_per_branch(
        model_id, dict(q_scale=0.25, k_scale=0.5, v_scale=1.0, gate_scale=1.0, up_scale=1.0),
        (("q", 0.25), ("k", 0.5), ("v", 1.0)), (("grad_norm.q", "attn.hook_q"), ("grad_norm.k", "attn.hook_k")))


@pytest.mark.parametrize("model_id", MODELS)
def test_last_layer_mlp_gate_up_halved_ungated_untouched(model_id):
    kind, name = model_id
    model = cached_model(*model_id)
    tokens, last = tokens_for_test(), model.cfg.n_layers - 1
    _, _, plain = run(model, tokens)
    _, _, scaled = run(model, tokens, GIMHookSet.preset("grad_norm"))
    roles = (("gate", 0.5), ("up", 0.5)) if is_gated(name) else (("mlp_in", 1.0),)
    if is_gated(name) and kind == "hooked":
        roles += (("gated_b_in", 1.0),)
    for role, factor in roles:
        assert_exact_multiple(last_layer_params(scaled, last, role), last_layer_params(plain, last, role), factor)


@pytest.mark.parametrize("model_id", GATED_MODELS)
def test_unequal_gate_up_factors_are_applied_per_branch(model_id):
    """gate ≠ up factors cannot share the product's gradient: each goes on its own hook point, still exact."""
    assert_factors_applied_per_branch(
        model_id, dict(q_scale=1.0, k_scale=1.0, v_scale=1.0, gate_scale=0.5, up_scale=0.25),
        (("gate", 0.5), ("up", 0.25)), (("grad_norm.gate", "mlp.hook_pre"), ("grad_norm.up", "mlp.hook_pre_linear")))


@pytest.mark.parametrize("model_id", GATED_MODELS)
def test_gate_up_rule_refuses_a_hook_post_that_is_not_the_product(model_id):
    """A hook that replaced hook_post before GIM's saw it leaves no product to scale: a clear error."""
    model = cached_model(*model_id)
    gim = GIMHookSet.preset("grad_norm")
    with model.hooks(fwd_hooks=[("blocks.0.mlp.hook_post", lambda x, hook: x + 0.0)] + gim.fwd_hooks(model)):
        with pytest.raises(GIMModelError, match=r"blocks\.0\.mlp\.hook_post is not act\(gate\)"):
            model(tokens_for_test())


# --------------------------------------------------------------------------------------
# 6. Against the independent reference implementation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", MODELS)
def test_reference_forward_matches_model(model_id):
    """The reference is only an oracle if its forward is the model's forward."""
    model = cached_model(*model_id)
    tokens = tokens_for_test()
    with torch.no_grad():
        logits = model(tokens)
        want = ref.forward(reference_arch(*model_id, model), reference_arch(*model_id, model).w_embed[tokens],
                           ref.Rules())
    assert max_rel_err(logits, want) <= REF_RTOL


@pytest.mark.parametrize("rule", SINGLE_RULES)
@pytest.mark.parametrize("model_id", MODELS)
def test_input_gradient_matches_reference(model_id, rule):
    model = cached_model(*model_id)
    tokens = tokens_for_test()
    arch = reference_arch(*model_id, model)
    _, got, _ = run(model, tokens, GIMHookSet.preset(rule))
    d = direction_for_test((BATCH, SEQ, tm.VOCAB))
    _, want, _ = ref.input_grad(arch, tokens, ref.Rules.named(rule), d)
    assert max_rel_err(got, want) <= REF_RTOL
    if rule != "plain":
        _, plain_ref, _ = ref.input_grad(arch, tokens, ref.Rules(), d)
        assert max_rel_err(want, plain_ref) > 10 * REF_RTOL, f"{rule} must visibly change the gradient here"


@pytest.mark.parametrize("model_id", MODELS)
def test_split_qkv_input_is_handled_or_refused(model_id):
    """With per-head q/k/v inputs (edge attribution), GIM must match the reference or refuse the model.

    A bridge recomputes ln1 per head through the raw HF norm in this mode, bypassing ln1's hook points.
    """
    model = fresh_model(*model_id)
    model.set_use_split_qkv_input(True)
    gim = GIMHookSet()
    try:
        gim.fwd_hooks(model)
    except GIMModelError:
        return  # an explicit refusal is acceptable; a silently different gradient is not
    tokens = tokens_for_test()
    _, got, _ = run(model, tokens, gim)
    d = direction_for_test((BATCH, SEQ, tm.VOCAB))
    arch = reference_arch(*model_id, cached_model(*model_id))  # same seed, same weights
    _, want, _ = ref.input_grad(arch, tokens, ref.Rules.named("gim"), d)
    assert max_rel_err(got, want) <= REF_RTOL, f"GIM differs from the reference with split q/k/v input:\n{gim.report()}"


@pytest.mark.parametrize("family", tm.BRIDGE_FAMILIES)
def test_bridge_compatibility_mode_matches_reference(family):
    """``enable_compatibility_mode()`` folds norms and centres weights (−inf masks, LNPre/RMSPre): same GIM.

    Centring the unembedding shifts each position's logits by a constant, so the readout is centred over
    the vocabulary, which makes the metric blind to that shift.
    """
    model = fresh_model("bridge", family)
    model.enable_compatibility_mode(disable_warnings=True)
    tokens = tokens_for_test()
    d = direction_for_test((BATCH, SEQ, tm.VOCAB))
    d = d - d.mean(-1, keepdim=True)
    arch = reference_arch("bridge", family, None)
    for rule in SINGLE_RULES:
        _, got, _ = run(model, tokens, GIMHookSet.preset(rule), direction=d)
        _, want, _ = ref.input_grad(arch, tokens, ref.Rules.named(rule), d)
        assert max_rel_err(got, want) <= REF_RTOL, rule


@pytest.mark.parametrize("model_id", MODELS)
def test_two_forwards_then_one_backward_adds_up(model_id):
    """Clean and corrupted runs inside one attach, one backward (attribution patching): the sum of both."""
    model = cached_model(*model_id)
    a, b = tokens_for_test(seed=1), tokens_for_test(seed=2)
    d = direction_for_test((BATCH, SEQ, tm.VOCAB))
    _, _, grads_a = run(model, a, GIMHookSet(), direction=d)
    _, _, grads_b = run(model, b, GIMHookSet(), direction=d)
    with GIMHookSet().attach(model):
        ((model(a) * d).sum() + (model(b) * d).sum()).backward()
    both = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for n in grads_a:
        assert max_rel_err(both[n], grads_a[n] + grads_b[n]) <= 1e-5, n


# --------------------------------------------------------------------------------------
# 7. Padding
# --------------------------------------------------------------------------------------


def padded_batch(side: str):
    """Example 0: 7 tokens; example 1: 4 tokens padded with 3 on ``side``.

    Returns tokens, attention mask, each example's last real position, and the two unpadded examples.
    """
    full = tokens_for_test(seed=5, batch=1, seq=7)[0]
    short = tokens_for_test(seed=6, batch=1, seq=4)[0]
    pad = torch.full((3,), tm.PAD_ID)
    left = side == "left"
    row = torch.cat([pad, short]) if left else torch.cat([short, pad])
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1] = torch.tensor([0, 0, 0, 1, 1, 1, 1] if left else [1, 1, 1, 1, 0, 0, 0])
    return torch.stack([full, row]), mask, [6, 6 if left else 3], full, short


def last_position_direction(n_pos: int, last: list[int]) -> torch.Tensor:
    """A readout of each example's last real position only (so padded positions feed nothing)."""
    d = torch.zeros(len(last), n_pos, tm.VOCAB)
    v = direction_for_test((tm.VOCAB,), seed=7)
    for b, p in enumerate(last):
        d[b, p] = v
    return d


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("model_id", MODELS)
def test_padding_gradients_are_finite_and_match_unpadded_runs(model_id, side):
    model = cached_model(*model_id)
    tokens, mask, last, full, short = padded_batch(side)
    gim = GIMHookSet()
    _, everywhere, _ = run(model, tokens, gim, attention_mask=mask)  # readout at every position, pads included
    assert torch.isfinite(everywhere).all()
    _, got, _ = run(model, tokens, gim, direction=last_position_direction(7, last), attention_mask=mask)
    _, alone_full, _ = run(model, full[None], gim, direction=last_position_direction(7, [6]))
    _, alone_short, _ = run(model, short[None], gim, direction=last_position_direction(4, [3]))
    real = slice(3, None) if side == "left" else slice(0, 4)
    assert max_rel_err(got[0], alone_full[0]) <= REF_RTOL
    assert max_rel_err(got[1, real], alone_short[0]) <= REF_RTOL
    assert torch.all(got[1, mask[1] == 0] == 0), "padded positions feed nothing: zero gradient"


@pytest.mark.parametrize("model_id", MODELS)
def test_left_padding_fully_masked_rows_get_zero_tsg_gradient(model_id):
    """Pad query rows see every key masked; read out at every position so they do receive a gradient."""
    model = cached_model(*model_id)
    tokens, mask, _, _, _ = padded_batch("left")
    scores, grads, _ = scores_and_grads(model, tokens, GIMHookSet(), attention_mask=mask)
    assert_all_fired(grads, model)
    for i in range(model.cfg.n_layers):
        s = scores[f"blocks.{i}.attn.hook_attn_scores"]
        empty = (s <= torch.finfo(s.dtype).min / 2).all(-1)
        assert empty.sum() > 0, "left padding must produce fully masked query rows"
        assert grads[f"blocks.{i}.attn.hook_pattern"][empty].abs().max() > 0, "the check would be vacuous"
        g = grads[f"blocks.{i}.attn.hook_attn_scores"]
        assert torch.isfinite(g).all() and torch.all(g[empty] == 0)


# --------------------------------------------------------------------------------------
# 8. Low precision
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("model_id", MODELS)
def test_low_precision_models(model_id, dtype):
    kind, name = model_id
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fresh_model(kind, name, dtype=dtype)
    tokens = tokens_for_test()
    logits_plain, _, _ = run(model, tokens)
    logits, got, _ = run(model, tokens, GIMHookSet())
    assert torch.equal(logits, logits_plain), "the forward pass must be bit-identical with GIM"
    assert torch.isfinite(got).all()
    _, fp32, _ = run(cached_model(kind, name), tokens, GIMHookSet())
    rel = ((got.float() - fp32).norm() / fp32.norm()).item()
    assert rel <= DTYPE_RTOL[dtype], f"{dtype} GIM gradient is {rel:.3g} (relative L2) from fp32"
    # "auto" keeps the scores for fp16 patterns (underflow) and the pattern otherwise.
    chosen = "scores" if dtype == torch.float16 else "pattern"
    other = "pattern" if chosen == "scores" else "scores"
    _, same, _ = run(model, tokens, GIMHookSet(tsg_source=chosen))
    _, diff, _ = run(model, tokens, GIMHookSet(tsg_source=other))
    assert torch.equal(got, same), f"auto should use the {chosen} source for {dtype}"
    assert not torch.equal(got, diff), "the two TSG sources must be distinguishable for this check to mean anything"


# --------------------------------------------------------------------------------------
# 9. Forward bit-identity and the ways to attach
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", MODELS)
def test_forward_is_bit_identical_for_every_attach_style(model_id):
    model = cached_model(*model_id)
    tokens = tokens_for_test()
    with torch.no_grad():
        plain = model(tokens)
    gim = GIMHookSet()
    logits = {}
    with model.hooks(fwd_hooks=gim.fwd_hooks(model), bwd_hooks=gim.bwd_hooks(model)):
        logits["hooks"] = model(tokens)
    with gim.attach(model):
        logits["attach"] = model(tokens)
    gim.add_to(model)
    try:
        logits["add_to"] = model(tokens)
    finally:
        gim.remove_from(model)
    logits["run_with_hooks"] = gim.run_with_hooks(model, tokens)
    model.zero_grad(set_to_none=True)
    for style, out in logits.items():
        assert out.requires_grad and torch.equal(out, plain), style


@pytest.mark.parametrize("model_id", MODELS)
def test_attach_styles_give_the_same_gim_gradient(model_id):
    model = cached_model(*model_id)
    tokens = tokens_for_test()
    d = direction_for_test((BATCH, SEQ, tm.VOCAB))
    _, _, want = run(model, tokens, GIMHookSet())
    _, _, plain = run(model, tokens)

    def param_grads(loss_fn):
        model.zero_grad(set_to_none=True)
        loss_fn().backward()
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    gim = GIMHookSet()

    def attached():
        with gim.attach(model):
            return (model(tokens) * d).sum()

    got = {"attach": param_grads(attached)}
    got["run_with_hooks"] = param_grads(lambda: (gim.run_with_hooks(model, tokens) * d).sum())
    for style, grads in got.items():
        assert grads.keys() == want.keys()
        assert all(torch.equal(grads[n], want[n]) for n in want), style
    assert any(not torch.equal(plain[n], want[n]) for n in want)


@pytest.mark.parametrize("model_id", MODELS)
def test_add_to_survives_reset_hooks_and_remove_from_keeps_user_hooks(model_id):
    model = fresh_model(*model_id)
    tokens = tokens_for_test()
    d = direction_for_test((BATCH, SEQ, tm.VOCAB))
    _, _, want = run(model, tokens, GIMHookSet())
    _, _, plain = run(model, tokens)

    def grads_now():
        model.zero_grad(set_to_none=True)
        (model(tokens) * d).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    gim = GIMHookSet()
    gim.add_to(model)
    model.reset_hooks()
    got = grads_now()
    assert all(torch.equal(got[n], want[n]) for n in want), "GIM must survive reset_hooks()"
    calls = []
    model.add_hook("blocks.0.hook_resid_pre", lambda x, hook: calls.append("fwd"))
    model.add_perma_hook("ln_final.hook_scale", lambda x, hook: calls.append("perma"))
    gim.remove_from(model)
    got = grads_now()
    assert all(torch.equal(got[n], plain[n]) for n in plain), "remove_from must restore plain gradients"
    assert calls == ["fwd", "perma"], "remove_from must leave the user's hooks in place"
    model.reset_hooks(including_permanent=True)


# --------------------------------------------------------------------------------------
# 10. Self-checks and model errors
# --------------------------------------------------------------------------------------


def expected_rules(kind: str, name: str, n_layers: int) -> set[tuple[str, str]]:
    """Every (rule, site) full GIM must report, derived from the architecture (not from the hook set)."""
    out = {("freeze_norm", "ln_final")}
    for i in range(n_layers):
        b = f"blocks.{i}"
        out |= {("tsg", f"{b}.attn"), ("grad_norm.qk", f"{b}.attn.hook_attn_scores"),
                ("grad_norm.v", f"{b}.attn.hook_v")}
        if is_gated(name):  # equal gate and up factors: once, on act(gate)·up behind hook_post
            out |= {("grad_norm.gate_up", f"{b}.mlp.hook_post")}
        norms = ("ln1", "ln1_post", "ln2", "ln2_post") if has_post_norms(name) else ("ln1", "ln2")
        out |= {("freeze_norm", f"{b}.{n}") for n in norms}
    return out


@pytest.mark.parametrize("model_id", MODELS)
def test_report_lists_every_rule_and_verify_checks_backward(model_id):
    model = cached_model(*model_id)
    tokens = tokens_for_test()
    gim = GIMHookSet()
    with gim.attach(model):
        logits = model(tokens)
        with pytest.raises(GIMRuleError):  # forward only: nothing applied in backward yet
            gim.verify()
        logits.sum().backward()
    model.zero_grad(set_to_none=True)
    report = gim.verify()
    assert {(r.rule, r.site) for r in report} == expected_rules(*model_id, model.cfg.n_layers)
    # One forward and one backward each; HookedTransformer runs ln1 three times (separate q/k/v inputs).
    calls = lambda r: 3 if model_id[0] == "hooked" and r.site.endswith(".ln1") else 1
    assert all(r.forward == calls(r) and r.backward == calls(r) for r in report), str(report)
    assert "did not fire" not in str(report)


def backward_from_layer_zero(model, gim: GIMHookSet) -> None:
    """Full forward with GIM, backward from a metric on layer 0's output only."""
    seen = {}
    keep = lambda x, hook: seen.__setitem__("resid", x)
    with model.hooks(fwd_hooks=gim.fwd_hooks(model) + [("blocks.0.hook_resid_post", keep)]):
        model(tokens_for_test())
        seen["resid"].sum().backward()
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("model_id", MODELS)
def test_verify_names_rules_that_got_no_gradient(model_id):
    """Layer 1's attention rules see no gradient: verify raises and names them; layer 0 is complete."""
    model = cached_model(*model_id)
    gim = GIMHookSet()
    backward_from_layer_zero(model, gim)
    with pytest.raises(GIMRuleError, match=r"blocks\.1\.attn"):
        gim.verify()
    missing = {(r.rule, r.site) for r in gim.report().missing}
    assert {("tsg", "blocks.1.attn"), ("grad_norm.qk", "blocks.1.attn.hook_attn_scores")} <= missing
    assert not any(site.startswith("blocks.0.") for _, site in missing), missing


@pytest.mark.parametrize("model_id", MODELS)
def test_verify_flags_norms_that_got_no_gradient(model_id):
    """No gradient reaches layer 1's norms or ln_final: their freeze must not be reported as applied."""
    model = cached_model(*model_id)
    gim = GIMHookSet()
    backward_from_layer_zero(model, gim)
    missing = {r.site for r in gim.report().missing if r.rule == "freeze_norm"}
    assert {"ln_final", "blocks.1.ln1", "blocks.1.ln2"} <= missing, f"reported as applied: {gim.report()}"


def metric_backward(model, logits) -> None:
    (logits * direction_for_test(logits.shape)).sum().backward()
    model.zero_grad(set_to_none=True)


def test_verify_with_one_set_on_two_models():
    """Counts belong to each model: hooks built for a second model, and its forward, before the first model's
    backward raise no false alarm, and the report names both models; a rule missing in one model is named."""
    model_a, model_b = cached_model("bridge", "llama"), cached_model("bridge", "qwen2")
    tokens = tokens_for_test()
    gim = GIMHookSet()
    with model_a.hooks(fwd_hooks=gim.fwd_hooks(model_a)):
        logits_a = model_a(tokens)
    with model_b.hooks(fwd_hooks=gim.fwd_hooks(model_b)):
        logits_b = model_b(tokens)
    metric_backward(model_a, logits_a)
    report = gim.verify()
    waiting = {r.model for r in report if r.awaiting_backward}
    assert waiting and waiting.isdisjoint({r.model for r in report if r.ok})
    metric_backward(model_b, logits_b)
    report = gim.verify()
    assert len({r.model for r in report}) == 2 and all(r.ok for r in report), str(report)
    assert {(r.rule, r.site) for r in report} == expected_rules("bridge", "llama", model_a.cfg.n_layers)
    assert "model" in str(report).splitlines()[0]

    gim.reset_counts()
    with gim.attach(model_a):
        metric_backward(model_a, model_a(tokens))
    backward_from_layer_zero(model_b, gim)
    with pytest.raises(GIMRuleError, match=r"Qwen2|#2") as error:  # the second model is the one named
        gim.verify()
    assert "blocks.1.attn" in str(error.value)
    assert all(r.model == gim.report().missing[0].model for r in gim.report().missing)


@pytest.mark.parametrize("model_id", [MODELS[0], MODELS[len(tm.BRIDGE_FAMILIES)]])
def test_verify_after_fwd_hooks_is_called_again_before_the_first_backward(model_id):
    """Building the hooks again (a second attach, run_with_hooks) before the first forward's backward neither
    wipes that forward's counts nor expects anything of the unused build."""
    model = cached_model(*model_id)
    tokens = tokens_for_test()
    gim = GIMHookSet()
    with gim.attach(model):
        logits = model(tokens)
    gim.fwd_hooks(model)  # built, never run
    with gim.attach(model):  # built and run, with its own backward later
        second = model(tokens_for_test(seed=3))
    metric_backward(model, logits)
    report = gim.verify()
    assert {r.pass_index for r in report if r.ok} == {0} and all(r.awaiting_backward for r in report if not r.ok)
    metric_backward(model, second)
    assert all(r.ok for r in gim.verify())
    assert {r.pass_index for r in gim.report()} == {0, 1}


@pytest.mark.parametrize("model_id", [MODELS[0], MODELS[len(tm.BRIDGE_FAMILIES)]])
def test_each_forward_pass_is_judged_on_its_own(model_id):
    """Two forwards in one attach: a complete backward of the second does not hide the rules that no gradient
    reached in the first."""
    model = cached_model(*model_id)
    gim = GIMHookSet()
    seen = {}
    keep = lambda x, hook: seen.__setitem__("resid", x)
    with gim.attach(model), model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", keep)]):
        model(tokens_for_test())
        first = seen["resid"]
        logits = model(tokens_for_test(seed=4))
    first.sum().backward()
    metric_backward(model, logits)
    with pytest.raises(GIMRuleError, match=r"blocks\.1\.attn"):
        gim.verify()
    missing = gim.report().missing
    assert missing and {r.pass_index for r in missing} == {0}
    assert all(r.ok for r in gim.report() if r.pass_index == 1)


@pytest.mark.parametrize("model_id", [MODELS[0], MODELS[len(tm.BRIDGE_FAMILIES)]])
def test_a_component_called_alone_is_judged_on_its_own_rules(model_id):
    """Inside the hooks, ln1 called on its own (as EAP does to pull gradients back through it) is a pass
    of its own, held to the rules it installed; a forward that stops before the last layer is flagged for the
    rules it never installed."""
    model = cached_model(*model_id)
    gim = GIMHookSet()
    with gim.attach(model):
        metric_backward(model, model(tokens_for_test()))
        x = torch.randn(2, 3, model.cfg.d_model, requires_grad=True)
        model.blocks[0].ln1(x).sum().backward()
    report = gim.verify()
    alone = [r for r in report if r.pass_index == 1]
    assert [(r.rule, r.site) for r in alone] == [("freeze_norm", "blocks.0.ln1")] and alone[0].ok

    gim.reset_counts()
    with gim.attach(model):
        model(tokens_for_test(), stop_at_layer=1).sum().backward()
    model.zero_grad(set_to_none=True)
    with pytest.raises(GIMRuleError, match=r"blocks\.1\.attn"):
        gim.verify()
    assert all(r.forward == 0 for r in gim.report().missing)
    assert {"ln_final", "blocks.1.ln1"} <= {r.site for r in gim.report().missing}


def test_hooks_built_before_reset_counts_count_again():
    """``add_to`` then ``reset_counts()``: the persistent hooks count into a new pass from their next forward."""
    model = fresh_model("bridge", "llama")
    gim = GIMHookSet()
    gim.add_to(model)
    try:
        metric_backward(model, model(tokens_for_test()))
        gim.reset_counts()
        with pytest.raises(GIMRuleError, match="no forward pass"):
            gim.verify()
        metric_backward(model, model(tokens_for_test()))
        report = gim.verify()
    finally:
        gim.remove_from(model)
    assert {r.pass_index for r in report} == {0} and all(r.forward == 1 and r.backward == 1 for r in report)


def test_forward_order_runs_through_a_layer_then_the_next():
    from gim_tl.report import forward_order

    sites = ["blocks.0.ln1", "blocks.0.attn.hook_v", "blocks.0.attn", "blocks.0.ln1_post", "blocks.0.ln2",
             "blocks.0.mlp.hook_post", "blocks.0.ln2_post", "blocks.1.ln1", "blocks.10.attn", "ln_final"]
    orders = [forward_order(s) for s in sites]
    assert orders == sorted(orders) and orders[1] == orders[2]
    assert len(set(orders)) == len(orders) - 1


def test_non_transformer_lens_model_is_rejected():
    with pytest.raises(GIMModelError, match="HookedTransformer or TransformerBridge"):
        GIMHookSet().fwd_hooks(nn.Linear(4, 4))


def _model_missing_hook_pattern():
    """A HookedRootModule named like TL's HookedTransformer whose attention lacks ``hook_pattern``."""
    from transformer_lens import HookedRootModule
    from transformer_lens.hook_points import HookPoint

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            for p in ("attn_scores", "q", "k", "v"):
                setattr(self, f"hook_{p}", HookPoint())

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attn()
            self.mlp = nn.Module()
            self.mlp.hook_pre = HookPoint()

    class HookedTransformer(HookedRootModule):
        def __init__(self):
            super().__init__()
            self.cfg = SimpleNamespace(n_layers=1, gated_mlp=False)
            self.blocks = nn.ModuleList([Block()])
            self.setup()

    return HookedTransformer()


def test_model_missing_a_hook_point_is_named():
    with pytest.raises(GIMModelError, match=r"blocks\.0\.attn\.hook_pattern"):
        GIMHookSet().fwd_hooks(_model_missing_hook_pattern())


def test_bridge_in_training_mode_is_rejected():
    model = fresh_model("bridge", "llama").train()
    with pytest.raises(GIMModelError, match="training mode"):
        GIMHookSet().fwd_hooks(model)


def test_bridge_norm_with_an_unknown_weight_convention_is_refused():
    """A norm that rescales by neither ``w`` nor ``1 + w`` cannot be frozen: refused, naming the norm."""
    model = fresh_model("bridge", "llama")
    hf_norm = model.blocks[0].ln1.original_component
    plain_forward = type(hf_norm).forward
    hf_norm.forward = lambda x: 2 * plain_forward(hf_norm, x)
    with pytest.raises(GIMModelError, match=r"blocks\.0\.ln1: the HF norm .* freeze_norm=False"):
        GIMHookSet().fwd_hooks(model)
    GIMHookSet(freeze_norm=False).fwd_hooks(model)  # the way out the message names


def test_bridge_norm_whose_eps_is_not_the_declared_one_is_refused():
    """σ is recomputed in backward with the norm's declared ε: a norm that uses another ε is refused."""
    model = fresh_model("bridge", "llama")
    hf_norm = model.blocks[1].ln2.original_component
    hf_norm.variance_epsilon = 1e-6
    used = 1e-2  # declares 1e-6, computes with 1e-2

    def forward(x):
        xf = x.float()
        return hf_norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + used)).to(x.dtype)

    hf_norm.forward = forward
    with pytest.raises(GIMModelError, match=r"blocks\.1\.ln2: .*1e-06"):
        GIMHookSet().fwd_hooks(model)


@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_bridge_norm_weight_convention_is_found_by_probe(family):
    """Gemma's RMSNorm scales by ``1 + w``, Llama's by ``w``: the probe tells them apart."""
    from gim_tl.layout import discover

    offsets = {n.weight_offset for n in discover(cached_model("bridge", family)).norms}
    assert offsets == ({1.0} if family == "gemma2" else {0.0})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", tm.BRIDGE_FAMILIES)
def test_bridge_norm_statistic_node_is_found_by_probe(family, dtype):
    """HF's RMSNorms written in PyTorch ops (Llama, Qwen2, Gemma2) are frozen by cutting their
    statistic's node, ``rsqrt(var + ε)``; GPT-2's fused LayerNorm has none: its backward is replaced."""
    from gim_tl.layout import discover

    model = cached_model("bridge", family) if dtype == torch.float32 else tm.bridge(family, dtype=dtype)
    norms = discover(model).norms
    if family == "gpt2":
        assert {(n.strategy, n.cut_path) for n in norms} == {("replace", ())}
    else:
        assert {(n.strategy, n.cut_names[-1]) for n in norms} == {("cut", "RsqrtBackward0")}


def test_bridge_norm_probe_in_inference_mode_is_not_kept():
    """Under ``torch.inference_mode`` the probe has no graph to cut: those norms are set to "replace"
    for that call only, and the next call outside it finds the statistic's node."""
    from gim_tl.layout import discover

    model = fresh_model("bridge", "llama")
    with torch.inference_mode():
        assert {n.strategy for n in discover(model).norms} == {"replace"}
    assert {n.strategy for n in discover(model).norms} == {"cut"}


def bridge_norms_forced_to(strategy: str, monkeypatch) -> list:
    """Make the hook set see every Bridge norm as ``strategy`` ("replace"; "stale": a cut site whose
    recorded graph no longer matches the model's); returns the list ``apply_norm_freeze`` calls land in."""
    import dataclasses

    import gim_tl.fast as fast
    import gim_tl.hookset as hookset

    discover = hookset.discover

    def forced(model, **kwargs):
        layout = discover(model, **kwargs)
        change = {"replace": dict(strategy="replace"), "stale": dict(cut_names=("NoSuchBackward0",) * 2)}[strategy]
        return dataclasses.replace(layout, norms=tuple(dataclasses.replace(n, **change) for n in layout.norms))

    replaced = []
    apply_norm_freeze = fast.apply_norm_freeze

    def counted(*args, **kwargs):
        replaced.append(1)
        return apply_norm_freeze(*args, **kwargs)

    monkeypatch.setattr(hookset, "discover", forced)
    monkeypatch.setattr(fast, "apply_norm_freeze", counted)
    return replaced


@pytest.mark.parametrize("strategy", ["cut", "replace", "stale"])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_bridge_norm_freeze_strategies_give_the_reference_gradient(family, strategy, monkeypatch):
    """Cutting the statistic's node, replacing the norm's backward, and a cut site whose graph is not
    the probe's (it falls back to replacing) all give the reference's frozen-norm input gradient, and
    a backward hook on ``ln_final.hook_in`` sees the reference's GIM gradient there (PyTorch runs it
    at a cut site; the set runs it where the norm's backward is replaced)."""
    replaced = [] if strategy == "cut" else bridge_norms_forced_to(strategy, monkeypatch)
    model = cached_model("bridge", family)
    tokens = tokens_for_test()
    seen = {}

    def keep(grad, hook):
        seen["ln_final.hook_in"] = grad.detach().clone()

    for rule in ("freeze_norm", "gim"):
        gim = GIMHookSet.preset(rule)
        _, got, _ = run(model, tokens, gim, bwd_hooks=[("ln_final.hook_in", keep)])
        gim.verify()
        _, want, record = ref.input_grad(reference_arch("bridge", family, model), tokens, ref.Rules.named(rule),
                                         direction_for_test((BATCH, SEQ, tm.VOCAB)))
        assert max_rel_err(got, want) <= REF_RTOL, rule
        assert max_rel_err(seen["ln_final.hook_in"], record["ln_final.hook_in"].grad) <= REF_RTOL, rule
    n_norms = 2 * model.cfg.n_layers + 1 + (2 * model.cfg.n_layers if family == "gemma2" else 0)
    assert len(replaced) == (0 if strategy == "cut" else 2 * n_norms)


@pytest.mark.parametrize("model_id", [MODELS[0], MODELS[len(tm.BRIDGE_FAMILIES)]])
def test_softmax_in_user_metric_is_untouched(model_id):
    """GIM changes attention softmaxes only: a metric's own (log-)softmax keeps its exact gradient."""
    model = cached_model(*model_id)
    tokens = tokens_for_test()
    target = tokens_for_test(seed=9)  # one target token per position
    metrics = {
        "log_softmax": lambda z: torch.log_softmax(z, -1).gather(-1, target[..., None]).sum(),
        "F.softmax": lambda z: torch.nn.functional.softmax(z, dim=-1).gather(-1, target[..., None]).sum(),
        "Tensor.softmax": lambda z: z.softmax(-1).gather(-1, target[..., None]).sum(),
    }
    for label, metric in metrics.items():
        with GIMHookSet().attach(model):
            logits = model(tokens)
            logits.retain_grad()
            metric(logits).backward()
        model.zero_grad(set_to_none=True)
        z = logits.detach().double()
        p = torch.softmax(z, -1)
        onehot = torch.nn.functional.one_hot(target, tm.VOCAB).double()
        want = onehot - p if label == "log_softmax" else p.gather(-1, target[..., None]) * (onehot - p)
        torch.testing.assert_close(logits.grad.double(), want, rtol=1e-5, atol=1e-6, msg=label)


# --------------------------------------------------------------------------------------
# 11. Multi-device
# --------------------------------------------------------------------------------------


@needs_hooked
@needs_two_gpus
def test_two_devices_keep_saved_tensors_on_their_layers_device():
    """Blocks split over two GPUs: every tensor autograd saves inside block i is on block i's device."""
    from transformer_lens.utilities.multi_gpu import get_device_for_block_index

    tokens = tokens_for_test()
    _, want, _ = run(fresh_model("hooked", "llama_like"), tokens, GIMHookSet())
    model = fresh_model("hooked", "llama_like")
    model.cfg.device, model.cfg.n_devices = "cuda", 2
    devices = [get_device_for_block_index(i, model.cfg) for i in range(model.cfg.n_layers)]
    assert len(set(devices)) == 2
    for block, device in zip(model.blocks, devices, strict=True):
        block.to(device)
    model.embed.to(devices[0])
    model.ln_final.to(devices[-1])
    model.unembed.to(devices[-1])
    current, wrong = {}, []

    def enter(i):
        return lambda x, hook: current.__setitem__("layer", i)

    def pack(t):
        layer = current.get("layer")
        if layer is not None and t.device != devices[layer]:
            wrong.append((layer, t.device, tuple(t.shape)))
        return t

    enter_hooks = [(f"blocks.{i}.hook_resid_pre", enter(i)) for i in range(model.cfg.n_layers)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, got, _ = run(model, tokens.to(devices[0]), GIMHookSet(), fwd_hooks=enter_hooks)
    assert not wrong, f"saved tensors off their layer's device: {wrong[:5]}"
    assert max_rel_err(got.cpu(), want) <= 1e-4


# --------------------------------------------------------------------------------------
# 12. run_with_cache(incl_bwd=True) under GIM
# --------------------------------------------------------------------------------------


def reference_loss_record(arch, tokens, rules):
    """The reference's next-token cross-entropy (TL's ``return_type="loss"``) and its retained intermediates."""
    embeds = arch.w_embed[tokens].detach().clone().requires_grad_(True)
    record: dict = {}
    logits = ref.forward(arch, embeds, rules, record)
    logp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, tokens[:, 1:, None])
    (-logp.mean()).backward()
    return record


def cache_and_reference(model_id):
    """GIM's ``run_with_cache(incl_bwd=True, return_type="loss")`` and the reference's retained gradients."""
    model = cached_model(*model_id)
    tokens = tokens_for_test()
    with GIMHookSet().attach(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bridge: bwd caching hooks on hook_scale switch RMSNorm to its python path
        _, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    model.zero_grad(set_to_none=True)
    record = reference_loss_record(reference_arch(*model_id, model), tokens, ref.Rules.named("gim"))
    return model, cache, record


def assert_cached_grads_match(model, cache, record, points) -> None:
    for i in range(model.cfg.n_layers):
        for point in points:
            name = f"blocks.{i}.{point}"
            assert f"{name}_grad" in cache, f"{name}_grad missing from run_with_cache(incl_bwd=True) under GIM"
            got, want = cache[f"{name}_grad"], record[name].grad
            assert got.shape == want.shape, name
            assert max_rel_err(got, want) <= REF_RTOL, name


@pytest.mark.parametrize("model_id", MODELS)
def test_run_with_cache_resid_and_qkv_grads(model_id):
    """Cached ``hook_resid_pre`` grads are GIM grads; ``hook_q/k`` grads carry the ¼, ``hook_v`` not the ½."""
    model, cache, record = cache_and_reference(model_id)
    assert_cached_grads_match(model, cache, record, ("hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v"))


@pytest.mark.parametrize("model_id", GATED_MODELS)
def test_run_with_cache_gated_mlp_grads(model_id):
    """Cached ``mlp.hook_pre/_pre_linear`` grads carry the ½ (it is applied below ``hook_post``, whose
    cached grad is the GIM gradient without it): each matches the reference's gradient at that point."""
    model, cache, record = cache_and_reference(model_id)
    assert_cached_grads_match(model, cache, record, ("mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post"))


@pytest.mark.parametrize("model_id", MODELS[: len(tm.BRIDGE_FAMILIES)])
def test_bridge_norm_hook_in_backward_hooks_see_the_gim_gradient(model_id):
    """``ln_final.hook_in`` (the last residual's only reader) sees the reference's GIM gradient in
    ``run_with_cache``, whose caching hooks on ``hook_scale`` switch the bridge's norms to TL's Python path:
    there the hook set replaces the norm's backward (the graph is not the probe's) and runs ``hook_in``'s
    backward hooks itself."""
    model, cache, record = cache_and_reference(model_id)
    got, want = cache["ln_final.hook_in_grad"], record["ln_final.hook_in"].grad
    assert got.shape == want.shape and max_rel_err(got, want) <= REF_RTOL


@pytest.mark.parametrize("model_id", MODELS)
def test_run_with_cache_attn_scores_grad_is_tsg_gradient(model_id):
    model, cache, record = cache_and_reference(model_id)
    assert_cached_grads_match(model, cache, record, ("attn.hook_attn_scores",))


def test_hooked_models_are_covered_where_available():
    """Guards against a silent skip: on TL 3.9 the HookedTransformer variants must build."""
    if not HAS_HOOKED:
        pytest.skip("TL 4: HookedTransformer is not importable")
    assert type(cached_model("hooked", tm.HT_VARIANTS[0])).__name__ == "HookedTransformer"


def test_bridge_norm_freeze_survives_a_second_backward_over_the_same_graph():
    """backward(retain_graph=True) twice: the norm freeze runs (and counts) both times, same gradient."""
    model = cached_model("bridge", "llama")
    tokens = torch.randint(4, tm.VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    gim = GIMHookSet.preset("freeze_norm")
    with gim.attach(model):
        loss = model(tokens)[0, -1, 5]
        first = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True, allow_unused=True)
        second = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert all(r.backward == 2 for r in gim.report()), str(gim.report())
