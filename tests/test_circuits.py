"""Circuits, edge patching and faithfulness (gim_tl.circuits) on tiny random models.

References are written independently of gim_tl.circuits: the clean and corrupt runs of the plain model, path
patches built by hand from TL's own per-head outputs (``hook_result``) and split inputs, CPR / CMD summed out
term by term, and EAP-IG from the hannamw/EAP-IG-style function of test_patching.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import cached_model, needs_hooked
from test_patching import METRIC, eap_ig_style, pair, with_edge_flags, without_edge_flags

from gim_tl import GIMHookSet, GIMModelError
from gim_tl.circuits import (
    MIB_FRACTIONS,
    Circuit,
    FaithfulnessCurve,
    cmd,
    cpr,
    faithfulness_curve,
    prune,
    random_edges,
)
from gim_tl.patching import EdgeGraph, EdgeResult, eap

warnings.filterwarnings("ignore", category=UserWarning)
pytestmark = pytest.mark.usefixtures("single_thread")

def hooked_qwen2():
    """A HookedTransformer converted from a tiny HF Qwen2 (q/k/v biases, GQA)."""
    import tiny_models

    from gim_tl import load_model

    return load_model(tiny_models.hf_model("qwen2"), backend="hooked", tokenizer=tiny_models.toy_tokenizer())


_QWEN = {}


def model_for(kind: str, name: str):
    if (kind, name) == ("hooked", "qwen2"):
        if "m" not in _QWEN:
            _QWEN["m"] = hooked_qwen2()
        return _QWEN["m"]
    return cached_model(kind, name)


MODELS = [pytest.param(("hooked", n), id=f"hooked-{n}", marks=needs_hooked)
          for n in ("llama_like", "gpt2_like", "qwen2")]
MODELS += [pytest.param(("bridge", n), id=f"bridge-{n}") for n in ("llama", "gpt2", "qwen2")]


# --------------------------------------------------------------------------------------
# C = all edges is the clean run, C = ∅ the corrupt run
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", MODELS)
def test_full_and_empty_circuits_are_clean_and_corrupt_runs(model_id):
    model = model_for(*model_id)
    clean, corrupt = pair()
    with torch.no_grad():
        m_clean, m_corrupt = float(METRIC(model(clean))), float(METRIC(model(corrupt)))
    assert abs(m_clean - m_corrupt) > 1e-2
    gqa = ["auto", "grouped"] if model_id[0] == "hooked" and model.cfg.n_key_value_heads else ["auto"]
    for mode in gqa:
        edges = eap(model, clean, corrupt, METRIC, gqa=mode)
        assert Circuit.full(edges).run(model, clean, corrupt, METRIC) == pytest.approx(m_clean, abs=1e-5)
        assert Circuit.empty(edges).run(model, clean, corrupt, METRIC) == pytest.approx(m_corrupt, abs=1e-5)
    for flag in ("use_split_qkv_input", "use_hook_mlp_in"):
        assert not getattr(model.cfg, flag)        # the caller's flags are restored
    assert not getattr(model.cfg, "ungroup_grouped_query_attention", False)


@needs_hooked
def test_ungrouped_graph_is_mibs_and_grouped_is_an_option():
    model = model_for("hooked", "llama_like")     # 2 layers, 4 query heads, 2 KV heads
    clean, corrupt = pair()
    ungrouped = eap(model, clean, corrupt, METRIC)
    grouped = eap(model, clean, corrupt, METRIC, gqa="grouped")
    assert "a1.h3<k>" in ungrouped.targets and "a1.kv1<k>" in grouped.targets
    # MIB's count: per layer l, 3 readers per head see 1 + l(H + 1) writers, the MLP H more; the logits all.
    count = sum(3 * 4 * (1 + layer * 5) + (1 + layer * 5 + 4) for layer in range(2)) + 1 + 2 * 5
    assert ungrouped.n_edges == count == 110
    # a KV head's gradient is the sum of its query heads' ungrouped k/v gradients, so scores add up
    for layer in range(2):
        for which in "kv":
            for g in range(2):
                total = sum(ungrouped.scores[:, ungrouped.targets.index(f"a{layer}.h{h}<{which}>")]
                            for h in (2 * g, 2 * g + 1))
                torch.testing.assert_close(total, grouped.scores[:, grouped.targets.index(f"a{layer}.kv{g}<{which}>")],
                                           rtol=1e-4, atol=1e-6, equal_nan=True)


def test_bridge_refuses_ungrouped_gqa():
    bridge = model_for("bridge", "llama")
    clean, corrupt = pair()
    with pytest.raises(GIMModelError, match="HookedTransformer"):
        eap(bridge, clean, corrupt, METRIC, gqa="ungrouped")
    graph = EdgeGraph(2, 4, 4)                     # ungrouped readers on a 2-KV-head model
    scores = torch.zeros(len(graph.sources), len(graph.targets)).masked_fill(~graph.edge_mask(), float("nan"))
    edges = EdgeResult(scores, graph.sources, graph.targets, "hand")
    with pytest.raises(GIMModelError, match="backend='hooked'"):
        Circuit.full(edges).run(bridge, clean, corrupt, METRIC)


# --------------------------------------------------------------------------------------
# Removing edges equals a path patch written out by hand
# --------------------------------------------------------------------------------------


def hand_path_patch(model, clean, corrupt, removed: list[tuple[str, str]], *, stored_clean: bool = False) -> float:
    """The metric on ``clean`` with each removed edge (writer, reader) patched by hand: the reader's input gets
    the writer's ``corrupt − current`` output (``stored_clean``: ``corrupt − clean``, the non-MIB variant).

    Writers: ``input`` (``blocks.0.hook_resid_pre``), ``a{l}.h{h}`` (TL's ``hook_result[h]``), ``m{l}``
    (``hook_mlp_out``). Readers: ``a{l}.h{h}<q|k|v>`` (TL's split inputs, per query head: ungrouped GQA),
    ``m{l}`` (``hook_mlp_in``), ``logits`` (last ``hook_resid_post``)."""
    def writer_hook(name: str) -> tuple[str, object]:
        if name == "input":
            return "blocks.0.hook_resid_pre", lambda x: x
        if name.startswith("m"):
            return f"blocks.{name[1:]}.hook_mlp_out", lambda x: x
        layer, head = name[1:].split(".h")
        return f"blocks.{layer}.attn.hook_result", lambda x, h=int(head): x[:, :, h]

    def reader_point(name: str) -> tuple[str, int | None]:
        if name == "logits":
            return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", None
        if name.startswith("m"):
            return f"blocks.{name[1:]}.hook_mlp_in", None
        node, which = name[:-1].split("<")
        layer, head = node[1:].split(".h")
        return f"blocks.{layer}.hook_{which}_input", int(head)

    model.set_use_split_qkv_input(True)
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    model.set_ungroup_grouped_query_attention(True)
    try:
        points = sorted({writer_hook(w)[0] for w, _ in removed})
        with torch.no_grad():
            _, corr = model.run_with_cache(corrupt, names_filter=lambda n: n in points)
            _, cln = model.run_with_cache(clean, names_filter=lambda n: n in points)
        current: dict[str, torch.Tensor] = {}

        def record(point):
            def hook(x, hook):
                current[point] = x.detach().clone()
            return hook

        fwd = [(p, record(p)) for p in points]
        for writer, reader in removed:
            point, pick = writer_hook(writer)
            target, index = reader_point(reader)

            def add(x, hook, point=point, pick=pick, index=index):
                base = cln[point] if stored_clean else current[point]
                delta = pick(corr[point]) - pick(base)
                x = x.clone()
                if index is None:
                    x += delta
                else:
                    x[:, :, index] += delta
                return x
            fwd.append((target, add))
        with torch.no_grad(), model.hooks(fwd_hooks=fwd):
            return float(METRIC(model(clean)))
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_attn_result(False)
        model.set_use_hook_mlp_in(False)
        model.set_ungroup_grouped_query_attention(False)


@needs_hooked
@pytest.mark.parametrize("variant", ["llama_like", "gpt2_like"])
@pytest.mark.parametrize("edge", ["a0.h1->a1.h2<q>", "a0.h0->a1.h3<k>", "a0.h2->a1.h1<v>", "input->m0",
                                  "a1.h2->m1", "m0->logits", "a0.h1->logits", "input->a1.h0<k>"])
def test_removing_one_edge_equals_hand_path_patch(variant, edge):
    model = model_for("hooked", variant)
    clean, corrupt = pair()
    edges = eap(model, clean, corrupt, METRIC)
    got = Circuit.full(edges).without(edge).run(model, clean, corrupt, METRIC)
    writer, reader = edge.split("->")
    want = hand_path_patch(model, clean, corrupt, [(writer, reader)])
    assert got == pytest.approx(want, abs=1e-5)
    with torch.no_grad():
        assert abs(want - float(METRIC(model(clean)))) > 1e-6   # the edge matters: the check can fail


@needs_hooked
def test_patching_uses_current_activations_not_a_stored_clean_run():
    """a1.h2's input is patched, so its current output differs from the clean one; the MIB intervention on
    a1.h2 → logits uses the current one."""
    model = model_for("hooked", "llama_like")
    clean, corrupt = pair()
    edges = eap(model, clean, corrupt, METRIC)
    removed = [("a0.h1", "a1.h2<q>"), ("a0.h1", "a1.h2<k>"), ("input", "a1.h2<v>"), ("a1.h2", "logits")]
    got = Circuit.full(edges).without(*(f"{w}->{r}" for w, r in removed)).run(model, clean, corrupt, METRIC)
    assert got == pytest.approx(hand_path_patch(model, clean, corrupt, removed), abs=1e-5)
    assert abs(got - hand_path_patch(model, clean, corrupt, removed, stored_clean=True)) > 1e-4


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bridge_one_edge_equals_hand_path_patch(family):
    """On a bridge (grouped GQA readers for Llama): a head → KV-head reader edge and a head → MLP edge."""
    model = model_for("bridge", family)
    clean, corrupt = pair()
    edges = eap(model, clean, corrupt, METRIC)
    kv = "a1.kv0<k>" if family == "llama" else "a1.h0<k>"
    for writer, reader, point, index in (("a0.h1", kv, "blocks.1.hook_k_input", 0),
                                         ("a0.h3", "m1", "blocks.1.hook_mlp_in", None)):
        got = Circuit.full(edges).without(f"{writer}->{reader}").run(model, clean, corrupt, METRIC)
        head = int(writer.split(".h")[1])
        w_o = model.blocks[0].attn.W_O[head]
        with torch.no_grad():
            _, corr = model.run_with_cache(corrupt, names_filter="blocks.0.attn.hook_z")
        out_corrupt = corr["blocks.0.attn.hook_z"][:, :, head] @ w_o
        current = {}

        def record(x, hook, head=head, current=current):
            current["z"] = x[:, :, head].detach().clone()

        def add(x, hook, index=index, out_corrupt=out_corrupt, current=current, w_o=w_o):
            x = x.clone()
            delta = out_corrupt - current["z"] @ w_o
            if index is None:
                x += delta
            else:
                x[:, :, index] += delta
            return x

        with_edge_flags(model)
        try:
            with torch.no_grad(), model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", record), (point, add)]):
                want = float(METRIC(model(clean)))
        finally:
            without_edge_flags(model)
        assert got == pytest.approx(want, abs=1e-5)


# --------------------------------------------------------------------------------------
# top_n and pruning
# --------------------------------------------------------------------------------------


def hand_edges(graph: EdgeGraph, scores: dict[str, float]) -> EdgeResult:
    s = torch.full((len(graph.sources), len(graph.targets)), 0.001)
    for name, value in scores.items():
        u, v = name.split("->")
        s[graph.sources.index(u), graph.targets.index(v)] = value
    return EdgeResult(s.masked_fill(~graph.edge_mask(), float("nan")), graph.sources, graph.targets, "hand")


def test_top_n_prunes_edges_off_every_input_to_logits_path():
    graph = EdgeGraph(2, 2, 2)
    edges = hand_edges(graph, {"input->a0.h0<q>": 9, "a0.h0->logits": 8,     # a path: kept
                               "input->m1": 7,                              # m1 feeds nothing kept
                               "a0.h1->logits": 6,                          # a0.h1 reads nothing kept
                               "a0.h0->a1.h1<v>": -5})                      # a1.h1 feeds nothing kept
    circuit = Circuit.top_n(edges, 5)
    assert sorted(circuit.edge_names) == ["a0.h0->logits", "input->a0.h0<q>"]
    assert Circuit.top_n(edges, 5, prune_paths=False).n_edges == 5
    assert Circuit.top_n(edges, 1).n_edges == 0            # input → a0.h0<q> alone reaches no logits
    assert circuit.nodes == ["input", "a0.h0", "logits"]
    assert Circuit.top_n(edges, torch.tensor(5)).edge_names == circuit.edge_names
    with pytest.raises(ValueError, match="non-negative integer"):
        Circuit.top_n(edges, 2.5)


def test_prune_with_grouped_kv_readers():
    graph = EdgeGraph(2, 4, 2)                             # KV group 0 = heads 0, 1; group 1 = heads 2, 3
    keep = torch.zeros(len(graph.sources), len(graph.targets), dtype=torch.bool)
    for u, v in (("input", "a1.kv0<k>"), ("input", "a1.kv1<k>"), ("a1.h1", "logits")):
        keep[graph.sources.index(u), graph.targets.index(v)] = True
    kept = prune(keep, graph)
    names = {(graph.sources[i], graph.targets[j]) for i, j in kept.nonzero().tolist()}
    assert names == {("input", "a1.kv0<k>"), ("a1.h1", "logits")}


# --------------------------------------------------------------------------------------
# Faithfulness, CPR, CMD
# --------------------------------------------------------------------------------------


def test_cpr_and_cmd_of_a_hand_made_curve():
    fractions = [0.001, 0.01, 0.1, 0.5, 1.0]
    f = [0.2, -0.4, 1.3, 0.9, 1.0]
    # written out: Σ (x2 − x1)(y1 + y2)/2
    want_cpr = (0.009 * (0.2 - 0.4) / 2 + 0.09 * (-0.4 + 1.3) / 2 + 0.4 * (1.3 + 0.9) / 2 + 0.5 * (0.9 + 1.0) / 2)
    want_cmd = (0.009 * (0.8 + 1.4) / 2 + 0.09 * (1.4 + 0.3) / 2 + 0.4 * (0.3 + 0.1) / 2 + 0.5 * (0.1 + 0.0) / 2)
    assert cpr(fractions, f) == pytest.approx(want_cpr, abs=1e-12)
    assert cmd(fractions, f) == pytest.approx(want_cmd, abs=1e-12)
    curve = FaithfulnessCurve(fractions, [0] * 5, [0] * 5, [1 + 2 * v for v in f], clean=3.0, corrupt=1.0,
                              total_edges=1000, method="hand")
    assert curve.faithfulness == pytest.approx(f)
    assert (curve.cpr, curve.cmd) == pytest.approx((want_cpr, want_cmd))
    with pytest.raises(ValueError, match="undefined"):
        _ = FaithfulnessCurve(fractions, [0] * 5, [0] * 5, [1.0] * 5, 1.0, 1.0, 1000, "flat").faithfulness


@needs_hooked
def test_faithfulness_curve_matches_circuit_runs():
    model = model_for("hooked", "llama_like")
    clean, corrupt = pair()
    edges = eap(model, clean, corrupt, METRIC, hook_set=GIMHookSet.preset("plain"))
    curve = faithfulness_curve(model, edges, clean, corrupt, METRIC, progress=False)
    assert curve.fractions == list(MIB_FRACTIONS)
    with torch.no_grad():
        assert curve.clean == pytest.approx(float(METRIC(model(clean))), abs=1e-5)
        assert curve.corrupt == pytest.approx(float(METRIC(model(corrupt))), abs=1e-5)
    for p, value, n in zip(curve.fractions, curve.metric, curve.n_edges, strict=True):
        circuit = Circuit.top_n(edges, int(p * edges.n_edges))
        assert circuit.n_edges == n
        assert value == pytest.approx(circuit.run(model, clean, corrupt, METRIC), abs=1e-5)
    assert curve.faithfulness[-1] == pytest.approx(1.0)
    again = faithfulness_curve(model, random_edges(edges, seed=3), clean, corrupt, METRIC, progress=False,
                               baselines=(curve.clean, curve.corrupt))
    assert again.faithfulness[-1] == pytest.approx(1.0) and again.method == "random"
    with pytest.raises(ValueError, match="increasing"):
        faithfulness_curve(model, edges, clean, corrupt, METRIC, fractions=[0.5, 0.1], progress=False)


# --------------------------------------------------------------------------------------
# EAP-IG on the inputs
# --------------------------------------------------------------------------------------


@needs_hooked
@pytest.mark.parametrize("preset", ["plain", "gim"])
def test_eap_ig_equals_eap_ig_style_user_code(preset):
    """eap(ig_steps=3) equals the hannamw/EAP-IG-structured function (run inside GIM for the GIM variant)."""
    model = model_for("hooked", "llama_like")
    clean, corrupt = pair()
    hook_set = GIMHookSet.preset(preset)
    ours = eap(model, clean, corrupt, METRIC, hook_set=hook_set, ig_steps=3, gqa="grouped")
    assert ours.method == ("EAP-IG" if preset == "plain" else "EAP-IG-GIM")
    with_edge_flags(model)
    try:
        if preset == "plain":
            theirs = eap_ig_style(model, clean, corrupt, METRIC, steps=3)
        else:
            with hook_set.attach(model):
                theirs = eap_ig_style(model, clean, corrupt, METRIC, steps=3)
    finally:
        without_edge_flags(model)
    torch.testing.assert_close(theirs, ours.scores, rtol=1e-4, atol=1e-6, equal_nan=True)
    one = eap(model, clean, corrupt, METRIC, hook_set=hook_set, ig_steps=1, gqa="grouped")
    torch.testing.assert_close(one.scores, eap(model, clean, corrupt, METRIC, hook_set=hook_set,
                                               gqa="grouped").scores, equal_nan=True)
    with pytest.raises(ValueError, match="ig_steps"):
        eap(model, clean, corrupt, METRIC, ig_steps=0)


# --------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------


def test_circuit_graph_and_plots():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    graph = EdgeGraph(2, 2, 2)
    edges = hand_edges(graph, {"input->a0.h0<q>": 9, "input->a0.h0<v>": 2, "a0.h0->logits": -8})
    circuit = Circuit.top_n(edges, 3)
    g = circuit.to_networkx()
    assert set(g.nodes) == {"input", "a0.h0", "logits"}
    assert g["input"]["a0.h0"]["score"] == pytest.approx(11.0) and g["input"]["a0.h0"]["readers"] == "q,v"
    assert isinstance(circuit.plot(), Figure) and isinstance(circuit.plot(context=2), Figure)
    wider = circuit.to_networkx(context=1)   # the strongest edge outside the circuit: 0.001 (the fill), first in order
    assert [d["in_circuit"] for *_, d in wider.edges(data=True)].count(False) == 1
    curve = FaithfulnessCurve([0.1, 1.0], [1, 10], [1, 10], [0.5, 1.0], 1.0, 0.0, 10, "hand")
    assert isinstance(curve.plot(), Figure) and len(curve.to_dataframe()) == 2
