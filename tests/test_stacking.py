"""One GIM set at a time: every way of activating GIM twice either refuses with GIMStackingError or gives
exactly the gradient of a single application; plain methods are plain or refuse.

Each habit runs on a tiny Llama-style TransformerBridge and, under TL 3.9, a HookedTransformer. The
single application is the same computation with no set on the model beforehand; a doubled application
(v, gate, up ×¼: what stacking used to give) is shown to differ from it, so the comparisons can fail.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from conftest import cached_model, fresh_model, needs_hooked

from gim_tl import GIMHookSet, activation_patching, atp, attribute_tokens, eap, logit_diff_metric
from gim_tl.layout import GIMModelError
from gim_tl.stacking import GIMStackingError, active_sets

MODELS = [pytest.param(("bridge", "llama"), id="bridge-llama"),
          pytest.param(("hooked", "llama_like"), id="hooked-llama_like", marks=needs_hooked)]

TOKENS = torch.tensor([[5, 9, 12, 20, 33, 7], [40, 8, 61, 17, 4, 29]])
CORRUPT = torch.tensor([[5, 9, 14, 20, 33, 7], [40, 8, 62, 17, 4, 29]])
METRIC = logit_diff_metric([11, 12], [13, 14])
RTOL = 1e-6


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def embed_grad(model, hooks=()) -> torch.Tensor:
    """The gradient of Σ logits·d at hook_embed, with ``hooks`` added for the pass (no GIM set of its own)."""
    seen = {}

    def leaf(x, hook):
        seen["e"] = x.detach().requires_grad_(True)
        return seen["e"]

    with torch.enable_grad(), model.hooks(fwd_hooks=[*hooks, ("hook_embed", leaf)]):
        logits = model(TOKENS)
        d = torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)
        (grad,) = torch.autograd.grad((logits * d).sum(), seen["e"])
    return grad


def single_gim(model) -> torch.Tensor:
    """One application of full GIM (nothing else on the model)."""
    assert not active_sets(model)
    return embed_grad(model, GIMHookSet().fwd_hooks(model))


@contextlib.contextmanager
def persistent(model, hook_set: GIMHookSet):
    hook_set.add_to(model)
    try:
        yield hook_set
    finally:
        hook_set.remove_from(model)
    assert not active_sets(model), "remove_from must leave no GIM hook behind"


def test_tl_hook_handles_keep_user_hook_and_is_permanent():
    """Detection reads ``LensHandle.user_hook`` / ``is_permanent`` of ``HookPoint.fwd_hooks``: fail loudly if
    a TransformerLens upgrade renames them (stacking would go undetected)."""
    model = cached_model("bridge", "llama")
    gim = GIMHookSet()
    with persistent(model, gim):
        point = model.hook_dict["blocks.0.attn.hook_v"]
        handles = point.fwd_hooks
        assert handles and all(hasattr(h, "user_hook") and hasattr(h, "is_permanent") for h in handles)
        assert [(a.hook_set, a.persistent) for a in active_sets(model)] == [(gim, True)]
    with gim.attach(model):
        assert [(a.hook_set, a.persistent) for a in active_sets(model)] == [(gim, False)]
    assert active_sets(model) == []


@pytest.mark.parametrize("model_id", MODELS)
def test_doubled_gim_differs_from_single(model_id):
    """The failure stacking would cause is visible on these models (so the equalities below can fail)."""
    model = cached_model(*model_id)
    doubled = GIMHookSet(v_scale=0.25, gate_scale=0.25, up_scale=0.25)
    assert max_rel_err(embed_grad(model, doubled.fwd_hooks(model)), single_gim(model)) > 1e-3


@pytest.mark.parametrize("model_id", MODELS)
@pytest.mark.parametrize("inner", ["same", "other"])
def test_nested_attach_is_refused(model_id, inner):
    model = cached_model(*model_id)
    outer = GIMHookSet()
    second = outer if inner == "same" else GIMHookSet.preset("tsg")
    with outer.attach(model):
        with pytest.raises(GIMStackingError, match=r"already active.*attach\(model\).*leave its"):
            with second.attach(model):
                pass
        with pytest.raises(GIMStackingError, match="already active"):
            second.fwd_hooks(model)
        with pytest.raises(GIMStackingError, match="already active"):
            second.run_with_hooks(model, TOKENS)
    assert max_rel_err(embed_grad(model, outer.fwd_hooks(model)), single_gim(model)) <= RTOL


@pytest.mark.parametrize("model_id", MODELS)
def test_add_to_then_attach_or_add_to_is_refused(model_id):
    model = cached_model(*model_id)
    gim = GIMHookSet()
    with persistent(model, gim):
        for second in (gim, GIMHookSet(), GIMHookSet.preset("plain")):
            with pytest.raises(GIMStackingError, match=r"persistently with add_to.*remove_from\(model\)"):
                with second.attach(model):
                    pass
            with pytest.raises(GIMStackingError, match="already active"):
                second.add_to(model)
        assert len(active_sets(model)) == 1
        # the persistent set alone gives the single-application gradient
        once = embed_grad(model)
    assert max_rel_err(once, single_gim(model)) <= RTOL


@pytest.mark.parametrize("model_id", MODELS)
def test_two_hook_lists_in_one_hooks_call_fail_at_forward(model_id):
    """Lists built before either was attached cannot be checked at fwd_hooks(): the hooks check at forward."""
    model = cached_model(*model_id)
    hooks = GIMHookSet().fwd_hooks(model) + GIMHookSet().fwd_hooks(model)
    with pytest.raises(GIMStackingError, match="two GIM installations"):
        embed_grad(model, hooks)
    assert active_sets(model) == []


@pytest.mark.parametrize("model_id", MODELS)
@pytest.mark.parametrize("how", ["add_to", "attach"])
def test_attribute_tokens_uses_an_attached_set_with_its_rules(model_id, how):
    model = cached_model(*model_id)
    want = attribute_tokens(model, TOKENS, 11, baseline="zero")
    assert want.label == "GIM"
    gim = GIMHookSet()
    with persistent(model, gim) if how == "add_to" else gim.attach(model):
        got = attribute_tokens(model, TOKENS, 11, baseline="zero")
        assert got.label == "GIM (attached set)" and got.method == "gim"
        gim.verify()  # the attached set is the one that ran (HookedTransformer: no "did not fire" false alarm)
    assert max_rel_err(got.scores, want.scores) <= RTOL


@pytest.mark.parametrize("model_id", MODELS)
@pytest.mark.parametrize("method", ["tsg", "grad_x_input", "integrated_gradients"])
def test_attribute_tokens_refuses_other_rules_or_plain_under_a_set(model_id, method):
    model = cached_model(*model_id)
    with persistent(model, GIMHookSet()):
        with pytest.raises(GIMStackingError, match=r"remove_from\(model\)"):
            attribute_tokens(model, TOKENS, 11, method=method, baseline="zero", ig_steps=2)
        with pytest.raises(GIMStackingError, match="plain gradients"):
            attribute_tokens(model, TOKENS, 11, hook_set=GIMHookSet.preset("plain"), baseline="zero")


@pytest.mark.parametrize("model_id", MODELS)
def test_atp_under_an_attached_set(model_id):
    model = cached_model(*model_id)
    want = atp(model, TOKENS, CORRUPT, METRIC, ("attn_head", "mlp_out"))
    with persistent(model, GIMHookSet()):
        got = atp(model, TOKENS, CORRUPT, METRIC, ("attn_head", "mlp_out"))
        with pytest.raises(GIMStackingError, match="plain gradients"):
            atp(model, TOKENS, CORRUPT, METRIC, method="grad_x_input")
        with pytest.raises(GIMStackingError, match="plain gradients"):
            atp(model, TOKENS, CORRUPT, METRIC, hook_set=GIMHookSet.preset("plain"))
        with pytest.raises(GIMStackingError, match="preset 'freeze_norm'"):
            atp(model, TOKENS, CORRUPT, METRIC, method="freeze_norm")
    for c in want:
        assert got[c].method == "AtP-GIM (attached set)" and want[c].method == "AtP-GIM"
        assert max_rel_err(got[c].scores, want[c].scores) <= RTOL


@pytest.mark.parametrize("model_id", MODELS)
def test_eap_under_an_attached_set(model_id):
    model = cached_model(*model_id)
    want = eap(model, TOKENS, CORRUPT, METRIC)
    with persistent(model, GIMHookSet()):
        got = eap(model, TOKENS, CORRUPT, METRIC)
        with pytest.raises(GIMStackingError, match="plain gradients"):
            eap(model, TOKENS, CORRUPT, METRIC, method="grad_x_input")
    assert got.method == "EAP-GIM (attached set)"
    ok = ~want.scores.isnan()
    assert torch.equal(ok, ~got.scores.isnan())
    assert max_rel_err(got.scores[ok], want.scores[ok]) <= RTOL


@pytest.mark.parametrize("model_id", MODELS)
def test_activation_patching_is_unchanged_by_an_attached_set(model_id):
    """Real interventions take no gradient, and GIM's forward is bit-identical: allowed, same numbers."""
    model = cached_model(*model_id)
    want = activation_patching(model, TOKENS, CORRUPT, METRIC, "attn_head", progress=False)
    with persistent(model, GIMHookSet()):
        got = activation_patching(model, TOKENS, CORRUPT, METRIC, "attn_head", progress=False)
    assert torch.equal(got.scores, want.scores) and want.scores.abs().max() > 0


@needs_hooked
def test_hooked_add_to_then_other_preset_names_the_attached_set_not_a_rule_that_did_not_fire():
    """Formerly: GIMRuleError '... freeze_norm ... did not fire'. Now the message names the attached set."""
    model = cached_model("hooked", "llama_like")
    with persistent(model, GIMHookSet()):
        with pytest.raises(GIMStackingError, match=r"asks for preset 'tsg'.*preset 'gim', attached persistently"):
            attribute_tokens(model, TOKENS, 11, method="tsg")


@pytest.mark.parametrize("model_id", MODELS)
def test_meta_device_model_is_refused_before_layout(model_id):
    model = fresh_model(*model_id).to_empty(device="meta")
    for call in (lambda: GIMHookSet().fwd_hooks(model),
                 lambda: attribute_tokens(model, TOKENS, 11, method="grad_x_input"),
                 lambda: atp(model, TOKENS, CORRUPT, METRIC)):
        with pytest.raises(GIMModelError, match="meta device"):
            call()


@pytest.mark.parametrize("name", ["plain", "freeze_norm", "grad_norm", "tsg", "gim"])
def test_boot_native_bridge_is_refused_for_every_preset(name):
    import transformer_lens
    from transformer_lens.model_bridge import TransformerBridge

    cfg = transformer_lens.TransformerBridgeConfig(
        n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=64, n_ctx=16, act_fn="silu",
        gated_mlp=True, normalization_type="RMS", final_rms=True, positional_embedding_type="rotary",
        rotary_dim=8, seed=0, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TransformerBridge.boot_native(cfg).eval()
    with pytest.raises(GIMModelError, match="boot_native"):
        GIMHookSet.preset(name).fwd_hooks(model)
