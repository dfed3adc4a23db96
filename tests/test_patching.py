"""AtP, EAP and activation patching with GIM gradients (gim_tl.patching) on tiny random models.

References are computed independently of gim_tl.patching: gradients come from zero "δ" leaves added at
the hook points (autograd reads ∂metric/∂δ = ∂metric/∂activation; no backward hooks), the EAP-IG-style
function below is written the way hannamw/EAP-IG structures it, and TL's own attribution_patch is run.
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from conftest import cached_model, needs_hooked

from gim_tl import GIMHookSet, GIMModelError, GIMRuleError
from gim_tl.patching import (
    EdgeGraph,
    EdgeResult,
    PatchingResult,
    activation_patching,
    atp,
    eap,
    logit_diff_metric,
)

warnings.filterwarnings("ignore", category=UserWarning)

METRIC = logit_diff_metric([5, 6, 7], [8, 9, 10])


def pair(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Three clean/corrupt prompts of 6 tokens that differ at positions 1 and 3."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(4, 64, (3, 6), generator=g)
    corrupt = clean.clone()
    corrupt[:, 1] = torch.randint(4, 64, (3,), generator=g)
    corrupt[:, 3] = torch.randint(4, 64, (3,), generator=g)
    return clean, corrupt


@pytest.fixture(scope="module")
def llama():
    return cached_model("bridge", "llama")   # GQA: 4 query heads, 2 KV heads; RMSNorm; gated MLP


@pytest.fixture(scope="module")
def gpt2():
    return cached_model("bridge", "gpt2")    # LayerNorm, joint qkv, non-gated MLP


@pytest.fixture(scope="module")
def hooked():
    return cached_model("hooked", "llama_like")   # TL 3.9 HookedTransformer, GQA, RMSNorm


def delta_run(model, tokens, names, hook_set=None, metric=METRIC):
    """Activations and ∂metric/∂activation at ``names`` via zero δ leaves (plain autograd, no backward hooks)."""
    acts, deltas = {}, {}

    def add_delta(name):
        def hook(x, hook):
            acts[name] = x.detach().clone()
            deltas[name] = torch.zeros_like(x, requires_grad=True)
            return x + deltas[name]
        return hook

    hooks = [(n, add_delta(n)) for n in names]
    ctx = hook_set.attach(model) if hook_set is not None else model.hooks()
    with ctx, model.hooks(fwd_hooks=hooks):
        value = metric(model(tokens))
        grads = torch.autograd.grad(value, [deltas[n] for n in names])
    return acts, dict(zip(names, grads, strict=True))


def hand_atp(model, clean, corrupt, hook, hook_set=None, feature_dim=True):
    """AtP by hand: Σ_batch,pos (corrupt − clean) · gradient, per layer (δ-leaf gradients)."""
    names = [hook.format(layer) for layer in range(model.cfg.n_layers)]
    acts, grads = delta_run(model, clean, names, hook_set)
    _, cache = model.run_with_cache(corrupt, names_filter=lambda n: n in names)
    out = []
    for n in names:
        prod = (cache[n] - acts[n]) * grads[n]
        out.append((prod.sum(-1) if feature_dim else prod).sum((0, 1)))
    return torch.stack(out).detach()


# --------------------------------------------------------------------------------------
# AtP
# --------------------------------------------------------------------------------------


ATP_MODELS = ["bridge-llama", "bridge-gpt2", pytest.param("hooked-llama_like", marks=needs_hooked),
              pytest.param("hooked-gpt2_like", marks=needs_hooked)]


def atp_model(model_id: str):
    return cached_model(*model_id.split("-", 1))


@pytest.mark.parametrize("model_id", ATP_MODELS)
def test_plain_atp_equals_autograd(model_id):
    """All rules off: AtP is (corrupt − clean) · the plain autograd gradient."""
    model = atp_model(model_id)
    clean, corrupt = pair()
    res = atp(model, clean, corrupt, METRIC, ("attn_head", "mlp_out", "mlp_neuron"),
              hook_set=GIMHookSet.preset("plain"))
    assert res["attn_head"].method == "AtP"
    torch.testing.assert_close(res["attn_head"].scores, hand_atp(model, clean, corrupt, "blocks.{}.attn.hook_z"))
    torch.testing.assert_close(res["mlp_out"].scores, hand_atp(model, clean, corrupt, "blocks.{}.hook_mlp_out"))
    torch.testing.assert_close(res["mlp_neuron"].scores,
                               hand_atp(model, clean, corrupt, "blocks.{}.mlp.hook_post", feature_dim=False))


@pytest.mark.parametrize("model_id", ATP_MODELS)
def test_gim_atp_equals_hand_computation(model_id):
    """AtP-GIM = (corrupt − clean) · gradient read at δ leaves with GIM attached; and it differs from plain."""
    model = atp_model(model_id)
    clean, corrupt = pair()
    gim = GIMHookSet()
    res = atp(model, clean, corrupt, METRIC, ("attn_head", "attn_out", "resid_pre"), per_position=True)
    assert res["attn_head"].method == "AtP-GIM" and res["attn_head"].axes == ("layer", "pos", "head")
    hand = hand_atp(model, clean, corrupt, "blocks.{}.attn.hook_z", gim)
    torch.testing.assert_close(res["attn_head"].sum("pos").scores, hand)
    torch.testing.assert_close(res["attn_out"].sum("pos").scores,
                               hand_atp(model, clean, corrupt, "blocks.{}.hook_attn_out", gim))
    plain = hand_atp(model, clean, corrupt, "blocks.{}.attn.hook_z")
    assert (hand - plain).abs().max() > 1e-3


def test_gim_atp_last_mlp_closed_form(llama):
    """Last MLP under GIM: the gradient is w_final ⊙ (u_answer − u_wrong) / rms (frozen final RMSNorm) / batch."""
    clean, corrupt = pair()
    last = llama.cfg.n_layers - 1
    res = atp(llama, clean, corrupt, METRIC, ("mlp_out",))["mlp_out"].scores[last]
    names = [f"blocks.{last}.hook_mlp_out", f"blocks.{last}.hook_resid_post"]
    _, c_clean = llama.run_with_cache(clean, names_filter=lambda n: n in names)
    _, c_corr = llama.run_with_cache(corrupt, names_filter=lambda n: n in names)
    hf = llama.original_model
    x = c_clean[names[1]][:, -1]
    rms = (x.pow(2).mean(-1, keepdim=True) + hf.model.norm.variance_epsilon).sqrt()
    unembed = hf.lm_head.weight
    direction = unembed[[5, 6, 7]] - unembed[[8, 9, 10]]
    grad = hf.model.norm.weight * direction / rms / 3
    delta = c_corr[names[0]][:, -1] - c_clean[names[0]][:, -1]
    torch.testing.assert_close(res, (delta * grad).sum().detach(), rtol=1e-5, atol=1e-6)


def test_atp_padding_positions_contribute_nothing(llama):
    clean, corrupt = pair()
    corrupt[:, 0] = 11                      # differs from clean at a position masked out as padding
    mask = torch.ones_like(clean)
    mask[:, 0] = 0
    res = atp(llama, clean, corrupt, METRIC, ("resid_pre",), attention_mask=mask)["resid_pre"]
    assert res.scores[:, 0].abs().max() == 0
    unmasked = atp(llama, clean, corrupt, METRIC, ("resid_pre",))["resid_pre"]
    assert unmasked.scores[:, 0].abs().max() > 0


def test_metric_must_be_scalar(llama):
    clean, corrupt = pair()
    with pytest.raises(ValueError, match="scalar"):
        atp(llama, clean, corrupt, lambda logits: logits[:, -1, 5])
    with pytest.raises(ValueError, match="equal shape"):
        atp(llama, clean, corrupt[:, :-1], METRIC)


# --------------------------------------------------------------------------------------
# EAP
# --------------------------------------------------------------------------------------


def check_edge_identities(model, clean, corrupt, hook_set, edges: EdgeResult):
    """The two identities of eap()'s docstring, against independent node AtP and δ-leaf gradients."""
    n_layers = model.cfg.n_layers
    nodes = atp(model, clean, corrupt, METRIC, ("attn_head", "mlp_out", "resid_pre"), hook_set=hook_set)
    totals = edges.source_totals()
    got = torch.tensor([totals[f"a{layer}.h{h}"] for layer in range(n_layers) for h in range(model.cfg.n_heads)])
    torch.testing.assert_close(got, nodes["attn_head"].scores.flatten(), rtol=1e-4, atol=1e-6)
    got = torch.tensor([totals[f"m{layer}"] for layer in range(n_layers)])
    torch.testing.assert_close(got, nodes["mlp_out"].scores, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(totals["input"]), nodes["resid_pre"].scores[0].sum(), rtol=1e-4, atol=1e-6)

    # reader side: Σ_u EAP(u → v) = Σ Δresid(v) · ∂metric/∂(v input), gradients from δ leaves
    pre, mid, post = "blocks.{}.hook_resid_pre", "blocks.{}.hook_attn_out", "blocks.{}.hook_resid_post"
    names = [p.format(layer) for layer in range(n_layers) for p in (pre, mid, post)]
    acts, grads = delta_run(model, clean, names, hook_set)
    _, corr = model.run_with_cache(corrupt, names_filter=lambda n: n in names)
    target = edges.target_totals()
    for layer in range(n_layers):
        d_pre = corr[pre.format(layer)] - acts[pre.format(layer)]
        d_mid = d_pre + corr[mid.format(layer)] - acts[mid.format(layer)]
        g_pre, g_mid, g_post = (grads[p.format(layer)] for p in (pre, mid, post))
        attn_readers = sum(v for k, v in target.items() if k.startswith(f"a{layer}."))
        torch.testing.assert_close(torch.tensor(attn_readers), (d_pre * (g_pre - g_mid)).sum().detach(),
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.tensor(target[f"m{layer}"]), (d_mid * (g_mid - g_post)).sum().detach(),
                                   rtol=1e-4, atol=1e-6)
    last = post.format(n_layers - 1)
    torch.testing.assert_close(torch.tensor(target["logits"]),
                               ((corr[last] - acts[last]) * grads[last]).sum().detach(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("preset", ["gim", "plain"])
def test_eap_identities_bridge(family, preset, llama, gpt2):
    model = {"llama": llama, "gpt2": gpt2}[family]
    clean, corrupt = pair()
    hook_set = GIMHookSet.preset(preset)
    edges = eap(model, clean, corrupt, METRIC, hook_set=hook_set)
    kv = 2 if family == "llama" else 4
    assert edges.scores.shape == (1 + 2 * 5, 2 * (4 + 2 * kv + 1) + 1)
    assert edges.n_edges == int(EdgeGraph(2, 4, kv).edge_mask().sum())
    check_edge_identities(model, clean, corrupt, hook_set, edges)


def test_eap_refuses_split_inputs_under_gim_on_bridge(llama):
    clean, corrupt = pair()
    with pytest.raises(GIMModelError, match="derived"):
        eap(llama, clean, corrupt, METRIC, qkv_inputs="split")


def test_eap_refuses_post_norm_models():
    clean, corrupt = pair()
    with pytest.raises(GIMModelError, match="post-norms"):
        eap(cached_model("bridge", "gemma2"), clean, corrupt, METRIC)


def eap_ig_style(model, clean, corrupt, metric, steps: int) -> torch.Tensor:
    """EAP-IG the way hannamw/EAP-IG structures it: a [batch, pos, source, d_model] difference matrix filled by
    forward hooks (corrupt run adds, clean run subtracts), backward hooks at every reader adding Σ diff · grad
    into a [source, target] matrix, and a loop over IG steps that interpolates the input (blocks.0.hook_resid_pre).
    Its Riemann points end at the clean input, so 1 step is plain EAP at the clean run. Needs split q/k/v
    inputs, hook_result and hook_mlp_in turned on."""
    n_layers, n_heads, d = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model
    graph = EdgeGraph(n_layers, n_heads, model.cfg.n_key_value_heads or n_heads)
    diff = torch.zeros(*clean.shape, len(graph.sources), d)
    scores = torch.zeros(len(graph.sources), len(graph.targets))
    start = lambda layer: 1 + layer * (n_heads + 1)   # noqa: E731  first source index of a layer
    src = [("blocks.0.hook_resid_pre", slice(0, 1))]
    for layer in range(n_layers):
        src.append((f"blocks.{layer}.attn.hook_result", slice(start(layer), start(layer) + n_heads)))
        src.append((f"blocks.{layer}.hook_mlp_out", slice(start(layer) + n_heads, start(layer + 1))))

    def store(index, sign):
        def hook(x, hook):
            diff[:, :, index] += sign * (x if x.ndim == 4 else x[:, :, None]).detach()
        return hook

    def accumulate(n_prev, columns):
        def hook(g, hook):
            g = g if g.ndim == 4 else g[:, :, None]
            scores[:n_prev, columns] += torch.einsum("bpsd,bptd->st", diff[:, :, :n_prev], g.detach())
        return hook

    bwd, col = [], 0
    for layer in range(n_layers):
        for which in "qkv":
            n = n_heads if which == "q" else graph.n_kv_heads
            bwd.append((f"blocks.{layer}.hook_{which}_input", accumulate(start(layer), slice(col, col + n))))
            col += n
        bwd.append((f"blocks.{layer}.hook_mlp_in", accumulate(start(layer) + n_heads, slice(col, col + 1))))
        col += 1
    bwd.append((f"blocks.{n_layers - 1}.hook_resid_post", accumulate(len(graph.sources), slice(col, col + 1))))
    with torch.no_grad():
        with model.hooks(fwd_hooks=[(n, store(i, 1.0)) for n, i in src]):
            model(corrupt)
        with model.hooks(fwd_hooks=[(n, store(i, -1.0)) for n, i in src]):
            model(clean)
    x_corrupt, x_clean = (model.run_with_cache(t, names_filter="blocks.0.hook_resid_pre")[1]["blocks.0.hook_resid_pre"]
                          for t in (corrupt, clean))
    for k in range(steps):
        alpha = (k + 1) / steps
        interpolate = lambda x, hook, a=alpha: (x_corrupt + a * (x_clean - x_corrupt)).requires_grad_(True)  # noqa: E731
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", interpolate)], bwd_hooks=bwd):
            metric(model(clean)).backward()
    model.zero_grad(set_to_none=True)
    return (scores / steps).masked_fill(~graph.edge_mask(), float("nan"))


def with_edge_flags(model):
    model.set_use_split_qkv_input(True)
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)


def without_edge_flags(model):
    model.set_use_split_qkv_input(False)
    model.set_use_attn_result(False)
    model.set_use_hook_mlp_in(False)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_eap_ig_style_user_code_matches_eap_bridge_plain(family, llama, gpt2):
    """Plain gradients on a bridge: TL's split inputs are exact there, so EAP-IG-style code at 1 step = eap()."""
    model = {"llama": llama, "gpt2": gpt2}[family]
    clean, corrupt = pair()
    ours = eap(model, clean, corrupt, METRIC, hook_set=GIMHookSet.preset("plain"))
    with_edge_flags(model)
    try:
        theirs = eap_ig_style(model, clean, corrupt, METRIC, steps=1)
    finally:
        without_edge_flags(model)
    torch.testing.assert_close(theirs, ours.scores, rtol=1e-4, atol=1e-6, equal_nan=True)


@needs_hooked
@pytest.mark.parametrize("variant", ["llama_like", "gpt2_like"])
def test_eap_hooked_split_equals_derived_and_identities(variant):
    """On HookedTransformer, TL's split q/k/v inputs and eap()'s derived per-head inputs agree (GQA and LayerNorm)."""
    hooked = cached_model("hooked", variant)
    clean, corrupt = pair()
    split = eap(hooked, clean, corrupt, METRIC)                       # auto = TL split inputs on HT
    derived = eap(hooked, clean, corrupt, METRIC, qkv_inputs="derived")
    assert not hooked.cfg.use_split_qkv_input                          # flag restored
    torch.testing.assert_close(split.scores, derived.scores, rtol=1e-4, atol=1e-6, equal_nan=True)
    check_edge_identities(hooked, clean, corrupt, GIMHookSet(), split)


@needs_hooked
def test_eap_ig_style_user_code_inside_gim_matches_eap_hooked(hooked):
    """GIM composed with EAP-IG-style user hooks: at 1 step its scores equal eap(); more steps still run."""
    clean, corrupt = pair()
    ours = eap(hooked, clean, corrupt, METRIC, gqa="grouped")      # the user code reads per-KV-head k/v inputs
    gim = GIMHookSet()
    with_edge_flags(hooked)
    try:
        with gim.attach(hooked):
            theirs = eap_ig_style(hooked, clean, corrupt, METRIC, steps=1)
            three = eap_ig_style(hooked, clean, corrupt, METRIC, steps=3)
        gim.verify()
    finally:
        without_edge_flags(hooked)
    torch.testing.assert_close(theirs, ours.scores, rtol=1e-4, atol=1e-6, equal_nan=True)
    assert (three - theirs).nan_to_num().abs().max() > 0


# --------------------------------------------------------------------------------------
# TransformerLens' own attribution_patch inside GIM
# --------------------------------------------------------------------------------------


def test_tl_attribution_patch_inside_gim(gpt2):
    """TL's node attribution_patch (gradient at the corrupt run) inside gim.attach = atp with the prompts swapped."""
    tl = pytest.importorskip("transformer_lens.tools.analysis.attribution_patching")
    clean, corrupt = pair()
    metric = lambda logits: (logits[:, -1, 5] - logits[:, -1, 8]).mean()  # noqa: E731  same for every prompt
    gim = GIMHookSet()
    with gim.attach(gpt2):
        result = tl.attribution_patch(gpt2, clean, corrupt, metric)
    gim.verify()
    ours = atp(gpt2, corrupt, clean, metric, ("attn_head", "mlp_out"), per_position=True)
    heads = torch.tensor([[[result.node_scores[tl.Node("attn_head_out", position=p, layer=layer, head=h)]
                            for h in range(4)] for p in range(6)] for layer in range(2)])
    torch.testing.assert_close(heads, ours["attn_head"].scores, rtol=1e-4, atol=1e-6)
    mlps = torch.tensor([[result.node_scores[tl.Node("mlp_out", position=p, layer=layer)] for p in range(6)]
                         for layer in range(2)])
    torch.testing.assert_close(mlps, ours["mlp_out"].scores, rtol=1e-4, atol=1e-6)

    # TL's edge granularity uses the bridge's split q/k/v path, whose per-head ln1 GIM cannot reach: verify() says so
    gim.reset_counts()
    try:
        with gim.attach(gpt2):
            tl.attribution_patch(gpt2, clean, corrupt, metric, tl.EdgeAttributionConfig(granularity="edge"))
    except NotImplementedError:
        return   # TL 3.9: edge granularity not implemented
    with pytest.raises(GIMRuleError, match="ln1"):
        gim.verify()


# --------------------------------------------------------------------------------------
# Activation patching
# --------------------------------------------------------------------------------------


def test_activation_patching_with_itself_is_zero(llama):
    clean, _ = pair()
    for component in ("attn_head", "mlp_out", "resid_pre"):
        res = activation_patching(llama, clean, clean, METRIC, component, progress=False)
        assert res.scores.abs().max() == 0, component


def test_activation_patching_full_resid_pre_layer0_is_corrupt_run(llama, gpt2):
    clean, corrupt = pair()
    for model in (llama, gpt2):
        res = activation_patching(model, clean, corrupt, METRIC, "resid_pre", per_position=False, progress=False)
        with torch.no_grad():
            expected = METRIC(model(corrupt)) - METRIC(model(clean))
        torch.testing.assert_close(res.scores[0], expected, rtol=1e-5, atol=1e-5)


def test_activation_patching_stacked_equals_one_by_one(llama):
    clean, corrupt = pair()
    stacked = activation_patching(llama, clean, corrupt, METRIC, "attn_head", progress=False)
    single = activation_patching(llama, clean, corrupt, METRIC, "attn_head", interventions_per_pass=1,
                                 progress=False)
    torch.testing.assert_close(stacked.scores, single.scores, rtol=1e-5, atol=1e-5)
    per_pos = activation_patching(llama, clean, corrupt, METRIC, "resid_pre", progress=False)
    assert per_pos.axes == ("layer", "pos")
    # position 0 never sees the changed tokens; at layer 0 only the changed positions 1 and 3 matter
    assert per_pos.scores[:, 0].abs().max() == 0 and per_pos.scores[0, [2, 4, 5]].abs().max() == 0
    assert per_pos.scores[0, [1, 3]].abs().min() > 0


def test_activation_patching_agrees_with_atp_on_largest_effects(llama):
    """Weak check: plain AtP (a true first-order estimate) has the sign of the three largest true head effects."""
    clean, corrupt = pair()
    truth = activation_patching(llama, clean, corrupt, METRIC, "attn_head", progress=False).scores.flatten()
    est = atp(llama, clean, corrupt, METRIC, ("attn_head",), hook_set=GIMHookSet.preset("plain"))
    est = est["attn_head"].scores.flatten()
    top = truth.abs().argsort(descending=True)[:3]
    assert torch.equal(truth[top].sign(), est[top].sign())
    assert torch.corrcoef(torch.stack([truth, est]))[0, 1] > 0.5


# --------------------------------------------------------------------------------------
# Result objects
# --------------------------------------------------------------------------------------


def test_patching_result_top_k_and_dataframe():
    scores = torch.tensor([[0.1, -3.0, 0.5], [2.0, 0.0, -0.2]])
    res = PatchingResult(scores, ("layer", "head"), "attn_head", "AtP-GIM")
    assert res.top_k(2) == [{"layer": 0, "head": 1, "score": -3.0}, {"layer": 1, "head": 0, "score": 2.0}]
    assert res.top_k(1, absolute=False) == [{"layer": 1, "head": 0, "score": 2.0}]
    frame = res.to_dataframe()
    assert len(frame) == 6
    assert frame.loc[(frame["layer"] == 0) & (frame["head"] == 2), "score"].item() == pytest.approx(0.5)
    labelled = PatchingResult(scores.T, ("pos", "layer"), "resid_pre", "x").with_labels("pos", ["a", "b", "c"])
    assert labelled.top_k(1)[0] == {"pos": "b", "layer": 0, "score": -3.0}
    with pytest.raises(ValueError):
        PatchingResult(scores, ("layer",), "attn_head", "x")


def test_edge_result_top_k():
    nan = float("nan")
    res = EdgeResult(torch.tensor([[1.0, -4.0], [nan, 2.0]]), ["input", "a0.h0"], ["a0.h0<q>", "logits"], "EAP")
    assert res.n_edges == 3
    assert [r["edge"] for r in res.top_k(5)] == ["input->logits", "a0.h0->logits", "input->a0.h0<q>"]
    assert res.source_totals() == {"input": -3.0, "a0.h0": 2.0}
    assert len(res.to_dataframe()) == 3


def test_plots():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    heads = PatchingResult(torch.randn(3, 4), ("layer", "head"), "attn_head", "AtP-GIM")
    assert heads.plot().axes[0].images[0].get_cmap().name == "RdBu_r"
    lo, hi = heads.plot().axes[0].images[0].get_clim()
    assert lo == -hi
    assert len(PatchingResult(torch.randn(3), ("layer",), "mlp_out", "AtP").plot().axes[0].lines) == 2
    with pytest.raises(ValueError, match="reduce"):
        PatchingResult(torch.randn(2, 3, 4), ("layer", "pos", "head"), "attn_head", "AtP").plot()


def test_atp_method_names_the_gradient_like_attribute_tokens(llama):
    """method= as in attribute_tokens; hook_set=None means method's set; a given set is named by its preset."""
    clean, corrupt = pair()
    by_name = atp(llama, clean, corrupt, METRIC, "attn_head", method="grad_x_input")
    by_set = atp(llama, clean, corrupt, METRIC, "attn_head", hook_set=GIMHookSet.preset("plain"))
    assert by_name.method == by_set.method == "AtP" and torch.equal(by_name.scores, by_set.scores)
    torch.testing.assert_close(by_name.scores, hand_atp(llama, clean, corrupt, "blocks.{}.attn.hook_z"))
    with pytest.warns(DeprecationWarning, match="'plain' is deprecated"):
        assert atp(llama, clean, corrupt, METRIC, "attn_head", method="plain").method == "AtP"
    tsg = atp(llama, clean, corrupt, METRIC, "attn_head", method="tsg")
    assert tsg.method == "AtP (+ TSG)"
    assert atp(llama, clean, corrupt, METRIC, "attn_head", hook_set=GIMHookSet.preset("tsg")).method == "AtP (+ TSG)"
    assert atp(llama, clean, corrupt, METRIC, "attn_head", hook_set=GIMHookSet(v_scale=0.3)).method == \
        "AtP (custom GIM)"
    assert eap(llama, clean, corrupt, METRIC, method="grad_x_input").method == "EAP"


def test_atp_and_activation_patching_take_components_the_same_way(llama):
    """A name gives one PatchingResult, a sequence of names a dict, in both; the old keyword warns."""
    clean, corrupt = pair()
    one = atp(llama, clean, corrupt, METRIC, components="attn_head")
    assert isinstance(one, PatchingResult) and one.component == "attn_head"
    both = atp(llama, clean, corrupt, METRIC, components=["attn_head", "mlp_out"])
    assert set(both) == {"attn_head", "mlp_out"} and torch.equal(both["attn_head"].scores, one.scores)
    truth = activation_patching(llama, clean, corrupt, METRIC, components="attn_out", progress=False)
    assert isinstance(truth, PatchingResult) and truth.component == "attn_out"
    several = activation_patching(llama, clean, corrupt, METRIC, components=("attn_out", "mlp_out"), progress=False)
    assert set(several) == {"attn_out", "mlp_out"} and torch.equal(several["attn_out"].scores, truth.scores)
    with pytest.warns(DeprecationWarning, match=r"component=\.\.\.\) is deprecated"):
        old = activation_patching(llama, clean, corrupt, METRIC, component="attn_out", progress=False)
    assert torch.equal(old.scores, truth.scores)
    with pytest.raises(TypeError, match="components must be a component name or a non-empty sequence"):
        atp(llama, clean, corrupt, METRIC, components=[])
    with pytest.raises(ValueError, match="unknown component 'attn'"):
        atp(llama, clean, corrupt, METRIC, components="attn")


def test_every_plot_returns_a_figure():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from gim_tl.attribution import TokenAttribution

    edge = EdgeResult(torch.tensor([[1.0, -4.0], [float("nan"), 2.0]]), ["input", "a0.h0"], ["a0.h0<q>", "logits"],
                      "EAP")
    heads = PatchingResult(torch.randn(3, 4), ("layer", "head"), "attn_head", "AtP-GIM")
    tokens = TokenAttribution(tokens=[["a", "b"]], token_ids=torch.tensor([[1, 2]]), scores=torch.tensor([[1.0, -2.0]]),
                              mask=torch.ones(1, 2, dtype=torch.bool), target_ids=torch.tensor([3]), contrast_ids=None,
                              target_strs=["c"], position=torch.tensor([1]), method="gim",
                              metric_values=torch.tensor([1.0]))
    for fig in (edge.plot(), heads.plot(), tokens.plot()):
        assert isinstance(fig, Figure)
