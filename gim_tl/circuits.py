"""Circuits over EAP's edge graph, and their faithfulness, evaluated the way MIB's circuit-localization track does.

A circuit ``C`` is a set of edges ``u → v`` of the graph :func:`gim_tl.patching.eap` scores (writers: the input,
each head, each MLP; readers: each head's q/k/v input, each MLP input, the logits). Running the model "with
the circuit" is an interchange intervention on every edge *outside* ``C``: on the clean prompt, each reader
``v`` receives

    input_v = (its input in this run) + Σ_{u : (u → v) ∉ C} (u_corrupt − u_current)

where ``u_current`` is ``u``'s output in this patched run itself (not a stored clean run), i.e. every reader
sees ``u_current`` through edges in ``C`` and ``u_corrupt`` through edges outside it. So ``C`` = all edges is
the clean run and ``C`` = ∅ the corrupt run. One forward pass per circuit, batched over prompts.

Faithfulness ``f(C) = (m(C) − m(∅)) / (m(full) − m(∅))`` over circuits made of the top 0.1 … 100 % of the
edges (by |score|, then pruned to edges on some input → logits path); CPR is the area under ``f`` and CMD
the area under ``|1 − f|``, both by the trapezoid rule over the edge fraction.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from gim_tl.layout import GIMModelError, model_kind
from gim_tl.patching import (
    EdgeGraph,
    EdgeResult,
    Metric,
    _check_pair,
    _forward,
    _refuse_non_additive,
    _scalar,
    _split_inputs,
    _ungrouped,
    is_grouped,
)

#: The edge fractions at which MIB's circuit-localization track evaluates a ranking.
MIB_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


# --------------------------------------------------------------------------------------
# The graph behind an EdgeResult
# --------------------------------------------------------------------------------------


def graph_of(edges: EdgeResult) -> EdgeGraph:
    """The :class:`EdgeGraph` whose sources and targets are ``edges``'; raises if the names do not fit one."""
    n_layers = sum(1 for s in edges.sources if s.startswith("m"))
    n_heads = sum(1 for s in edges.sources if s.startswith("a0."))
    n_kv = sum(1 for t in edges.targets if t.startswith("a0.") and t.endswith("<k>"))
    graph = EdgeGraph(n_layers, n_heads, n_kv)
    if graph.sources != list(edges.sources) or graph.targets != list(edges.targets):
        raise ValueError("these edges are not the residual-stream graph eap() scores (sources input, a{l}.h{h}, "
                         "m{l}; targets a{l}.h{h}<q/k/v>, m{l}, logits); build them with gim_tl.eap")
    return graph


def target_node(name: str) -> str:
    """The node a reader belongs to: ``a3.h2<q>`` → ``a3.h2``; a KV-head reader ``a3.kv1<k>`` → ``a3.kv1``."""
    return name.split("<")[0]


def _layer_slices(graph: EdgeGraph) -> tuple[list[slice], list[slice], list[int], list[int]]:
    """Per layer: the source slice of its heads, the target slice of its q/k/v readers, its MLP's source and
    target index."""
    heads, qkv, mlp_src, mlp_tgt = [], [], [], []
    per_attn = graph.n_heads + 2 * graph.n_kv_heads
    for layer in range(graph.n_layers):
        first = 1 + layer * (graph.n_heads + 1)
        heads.append(slice(first, first + graph.n_heads))
        mlp_src.append(first + graph.n_heads)
        t0 = layer * (per_attn + 1)
        qkv.append(slice(t0, t0 + per_attn))
        mlp_tgt.append(t0 + per_attn)
    return heads, qkv, mlp_src, mlp_tgt


# --------------------------------------------------------------------------------------
# Pruning
# --------------------------------------------------------------------------------------


def input_columns(graph: EdgeGraph) -> list[list[int]]:
    """For each source node, the target columns that are its inputs (a head's q, k, v readers, with grouped
    GQA its KV group's k and v readers; an MLP's input; none for ``input``)."""
    per_attn = graph.n_heads + 2 * graph.n_kv_heads
    group = graph.n_heads // graph.n_kv_heads
    cols: list[list[int]] = [[]]
    for layer in range(graph.n_layers):
        t0 = layer * (per_attn + 1)
        for h in range(graph.n_heads):
            g = h if graph.n_kv_heads == graph.n_heads else h // group
            cols.append([t0 + h, t0 + graph.n_heads + g, t0 + graph.n_heads + graph.n_kv_heads + g])
        cols.append([t0 + per_attn])
    return cols


def prune(keep: Bool[Tensor, "source target"], graph: EdgeGraph) -> Bool[Tensor, "source target"]:
    """Keep only edges on some input → logits path: ``u`` reachable from ``input`` and ``v`` leading to
    ``logits``, both through kept edges (what MIB's pruning leaves). A KV-group reader leads to the logits
    if any head of its group does."""
    keep = keep.bool()
    inputs = input_columns(graph)
    n_src, n_tgt = keep.shape
    reached = torch.zeros(n_src, dtype=torch.bool)
    reached[0] = True
    for i in range(1, n_src):                            # sources are in residual order
        reached[i] = bool((keep[:, inputs[i]] & reached[:, None]).any())
    leads = torch.zeros(n_tgt, dtype=torch.bool)
    leads[-1] = True                                     # logits
    for i in range(n_src - 1, 0, -1):                    # reverse residual order: every reader of i's output
        if bool((keep[i] & leads).any()):                # is later than i, so already settled
            leads[inputs[i]] = True
    return keep & reached[:, None] & leads[None, :]


# --------------------------------------------------------------------------------------
# Edge patching (MIB's interchange intervention, with current activations)
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _edge_mode(model, ungroup: bool) -> Iterator[None]:
    """Split q/k/v inputs, ``hook_mlp_in`` and (if asked) ungrouped GQA on, the caller's flags restored after."""
    saved_mlp_in = bool(getattr(model.cfg, "use_hook_mlp_in", False))
    try:
        model.set_use_hook_mlp_in(True)
        with _split_inputs(model, True), _ungrouped(model, ungroup):
            yield
    finally:
        model.set_use_hook_mlp_in(saved_mlp_in)


def _check_model(model, graph: EdgeGraph) -> bool:
    """Refuse models edge patching cannot be exact on; return whether k/v readers are ungrouped."""
    _refuse_non_additive(model)
    kind = model_kind(model)
    cfg = model.cfg
    if (int(cfg.n_layers), int(cfg.n_heads)) != (graph.n_layers, graph.n_heads):
        raise ValueError(f"the edges are for {graph.n_layers} layers × {graph.n_heads} heads, the model has "
                         f"{cfg.n_layers} × {cfg.n_heads}")
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    if graph.n_kv_heads not in (n_kv, int(cfg.n_heads)):
        raise ValueError(f"the edges have {graph.n_kv_heads} k/v readers per layer; the model has {n_kv} KV heads")
    ungroup = is_grouped(model) and graph.n_kv_heads == int(cfg.n_heads)
    if ungroup and kind != "hooked":
        raise GIMModelError("these edges give every query head its own k/v reader (ungrouped GQA, MIB's graph), "
                            "which needs TL 3.9's HookedTransformer (ungroup_grouped_query_attention); a "
                            "TransformerBridge has no ungrouped mode. Use load_model(backend='hooked'), or score "
                            "the edges with eap(..., gqa='grouped').")
    return ungroup


@dataclass
class _Patcher:
    """Edge patching on one clean/corrupt batch: the corrupt writer outputs cached once, then one forward per
    circuit. Writer outputs are kept source-major (``[source, batch, pos, d_model]``) so that each reader's
    update is one matrix product over the sources."""

    model: object
    graph: EdgeGraph
    clean: Tensor
    mask: Tensor | None
    ungroup: bool
    corrupt_out: Float[Tensor, "source batch pos d_model"] = field(repr=False)

    @classmethod
    def build(cls, model, graph: EdgeGraph, clean: Tensor, corrupt: Tensor, attention_mask: Tensor | None
              ) -> _Patcher:
        mask = _check_pair(clean, corrupt, attention_mask)
        ungroup = _check_model(model, graph)
        patcher = cls(model, graph, clean, mask, ungroup, torch.empty(0))
        store: dict[int, Tensor] = {}
        with torch.no_grad(), _edge_mode(model, ungroup), model.hooks(fwd_hooks=patcher._writer_hooks(store)):
            _forward(model, corrupt, mask)
        patcher.corrupt_out = torch.cat([store[i] for i in sorted(store)], dim=0)
        return patcher

    def _writer_hooks(self, store: dict[int, Tensor], subtract: Tensor | None = None) -> list:
        """Forward hooks recording each writer's output (``store[first source index]`` = ``[n, b, p, d]``);
        with ``subtract`` (a copy of the corrupt outputs), they turn its rows into ``corrupt − current``."""
        model, graph = self.model, self.graph
        heads, _, mlp_src, _ = _layer_slices(graph)

        def record(index: int, width: int, per_head_w_o=None):
            def hook(x, hook):
                if per_head_w_o is None:
                    out = x[None]                                                    # [1, b, p, d]
                else:
                    out = torch.einsum("bphe,hed->hbpd", x, per_head_w_o)            # [head, b, p, d]
                if subtract is None:
                    store[index] = out.detach().clone()
                else:
                    subtract[index:index + width] -= out.detach()
                return None
            return hook

        hooks = [("blocks.0.hook_resid_pre", record(0, 1))]
        for layer in range(graph.n_layers):
            w_o = model.blocks[layer].attn.W_O
            hooks.append((f"blocks.{layer}.attn.hook_z", record(heads[layer].start, graph.n_heads, w_o)))
            hooks.append((f"blocks.{layer}.hook_mlp_out", record(mlp_src[layer], 1)))
        return hooks

    def run(self, keep: Bool[Tensor, "source target"]) -> Float[Tensor, "batch pos vocab"]:
        """Logits of the clean batch with every edge outside ``keep`` carrying its corrupt value."""
        graph = self.graph
        drop = (~keep & graph.edge_mask()).to(self.corrupt_out.dtype).to(self.corrupt_out.device)
        diff = self.corrupt_out.clone()              # rows become corrupt − current as the writers fire
        heads, qkv, mlp_src, mlp_tgt = _layer_slices(graph)
        n_q, n_kv = graph.n_heads, graph.n_kv_heads

        def reader(n_prev: int, cols: slice):
            weights = drop[:n_prev, cols].T.contiguous()                             # [reader, source]
            if not bool(weights.any()):
                return None

            def hook(x, hook):
                flat = diff[:n_prev].reshape(n_prev, -1)
                update = (weights @ flat).reshape(weights.shape[0], *diff.shape[1:])   # [reader, b, p, d]
                if x.ndim == 3:                                                      # one reader: [b, p, d]
                    return x + update[0].to(x.dtype)
                return x + update.permute(1, 2, 0, 3).to(x.dtype)                    # [b, p, reader, d]
            return hook

        hooks = self._writer_hooks({}, subtract=diff)
        for layer in range(graph.n_layers):
            first = heads[layer].start
            t0 = qkv[layer].start
            parts = {"q": slice(t0, t0 + n_q), "k": slice(t0 + n_q, t0 + n_q + n_kv),
                     "v": slice(t0 + n_q + n_kv, t0 + n_q + 2 * n_kv)}
            for which, cols in parts.items():
                hook = reader(first, cols)
                if hook is not None:
                    hooks.append((f"blocks.{layer}.hook_{which}_input", hook))
            hook = reader(mlp_src[layer], slice(mlp_tgt[layer], mlp_tgt[layer] + 1))
            if hook is not None:
                hooks.append((f"blocks.{layer}.hook_mlp_in", hook))
        n_t = len(graph.targets)
        hook = reader(len(graph.sources), slice(n_t - 1, n_t))
        if hook is not None:
            hooks.append((f"blocks.{graph.n_layers - 1}.hook_resid_post", hook))
        with torch.no_grad(), _edge_mode(self.model, self.ungroup), self.model.hooks(fwd_hooks=hooks):
            return _forward(self.model, self.clean, self.mask)


# --------------------------------------------------------------------------------------
# Circuit
# --------------------------------------------------------------------------------------


@dataclass
class Circuit:
    """A set of edges of EAP's graph (``keep[source, target]``), with the scores it was chosen from."""

    keep: Bool[Tensor, "source target"]
    edges: EdgeResult

    def __post_init__(self) -> None:
        self.graph = graph_of(self.edges)
        if tuple(self.keep.shape) != tuple(self.edges.scores.shape):
            raise ValueError(f"keep {tuple(self.keep.shape)} does not match the edges {tuple(self.edges.scores.shape)}")
        self.keep = self.keep.bool().cpu() & self.graph.edge_mask()

    def __repr__(self) -> str:
        return f"Circuit({self.n_edges} of {self.graph.edge_mask().sum()} edges, {len(self.nodes)} nodes)"

    # ---- construction --------------------------------------------------------------

    @classmethod
    def top_n(cls, edges: EdgeResult, n: int, *, absolute: bool = True, prune_paths: bool = True) -> Circuit:
        """The ``n`` edges with the largest ``|score|`` (``absolute=False``: largest signed score), then (by
        default) pruned to those on an input → logits path, as MIB does; ties keep the earlier edge."""
        if isinstance(n, bool) or not hasattr(n, "__index__") or operator.index(n) < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        n = operator.index(n)
        flat = edges.scores.flatten().float()
        key = torch.nan_to_num(flat.abs() if absolute else flat, nan=-math.inf)
        order = key.argsort(descending=True, stable=True)[: min(n, edges.n_edges)]
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[order] = True
        circuit = cls(keep.reshape(edges.scores.shape), edges)
        return circuit.pruned() if prune_paths else circuit

    @classmethod
    def full(cls, edges: EdgeResult) -> Circuit:
        return cls(torch.ones(edges.scores.shape, dtype=torch.bool), edges)

    @classmethod
    def empty(cls, edges: EdgeResult) -> Circuit:
        return cls(torch.zeros(edges.scores.shape, dtype=torch.bool), edges)

    @classmethod
    def from_names(cls, edges: EdgeResult, names: Sequence[str]) -> Circuit:
        """A circuit from edge names ``"a0.h1->a2.h3<q>"`` (see :meth:`EdgeResult.top_k`)."""
        keep = torch.zeros(edges.scores.shape, dtype=torch.bool)
        for name in names:
            source, _, target = name.partition("->")
            if source not in edges.sources or target not in edges.targets:
                raise ValueError(f"no edge {name!r}: write it as 'source->target', e.g. 'a0.h1->m2'")
            keep[edges.sources.index(source), edges.targets.index(target)] = True
        return cls(keep, edges)

    def without(self, *names: str) -> Circuit:
        """This circuit minus the named edges (``"u->v"``)."""
        keep = self.keep.clone()
        for name in names:
            source, _, target = name.partition("->")
            keep[self.edges.sources.index(source), self.edges.targets.index(target)] = False
        return Circuit(keep, self.edges)

    def pruned(self) -> Circuit:
        """Only the edges that lie on some input → logits path."""
        return Circuit(prune(self.keep, self.graph), self.edges)

    # ---- inspection ----------------------------------------------------------------

    @property
    def n_edges(self) -> int:
        return int(self.keep.sum())

    @property
    def edge_names(self) -> list[str]:
        rows, cols = self.keep.nonzero(as_tuple=True)
        return [f"{self.edges.sources[i]}->{self.edges.targets[j]}" for i, j in zip(rows.tolist(), cols.tolist(),
                                                                                   strict=True)]

    @property
    def nodes(self) -> list[str]:
        """Nodes touched by a kept edge (readers collapsed to their head / MLP), in residual order."""
        rows, cols = self.keep.nonzero(as_tuple=True)
        names = {self.edges.sources[i] for i in rows.tolist()} | {target_node(self.edges.targets[j])
                                                                  for j in cols.tolist()}
        order = {n: i for i, n in enumerate(self.edges.sources + ["logits"])}
        return sorted(names, key=lambda n: order.get(n, len(order)))

    # ---- evaluation ----------------------------------------------------------------

    def run(self, model, clean: Int[Tensor, "batch pos"], corrupt: Int[Tensor, "batch pos"], metric: Metric, *,
            attention_mask: Tensor | None = None) -> float:
        """``metric`` on the clean prompts with every edge outside the circuit carrying its corrupt value
        (MIB's interchange intervention, current activations). One corrupt and one patched forward pass."""
        patcher = _Patcher.build(model, self.graph, clean, corrupt, attention_mask)
        return float(_scalar(metric(patcher.run(self.keep))))

    # ---- drawing -------------------------------------------------------------------

    def to_networkx(self, context: int = 0):
        """A ``networkx.DiGraph`` of the circuit: nodes ``input``, ``a{l}.h{h}``, ``m{l}``, ``logits`` (attribute
        ``layer``: residual order), one edge per (writer, node) with ``score`` = Σ over its q/k/v readers,
        ``readers`` (e.g. ``"q,v"``) and ``in_circuit``. ``context=k`` adds the k strongest edges outside the
        circuit (``in_circuit=False``; nodes only they touch get ``in_circuit=False`` too)."""
        import networkx as nx

        g = nx.DiGraph()
        rank = {"input": 0, "logits": 2 * self.graph.n_layers + 1}
        for layer in range(self.graph.n_layers):
            rank[f"m{layer}"] = 2 * layer + 2
        extra = torch.zeros_like(self.keep)
        if context > 0:
            flat = self.edges.scores.flatten().float().abs().nan_to_num(nan=-math.inf)
            flat[self.keep.flatten()] = -math.inf
            order = flat.argsort(descending=True, stable=True)[:context]
            extra.view(-1)[order[flat[order] > -math.inf]] = True
        for mask, inside in ((self.keep, True), (extra, False)):
            rows, cols = mask.nonzero(as_tuple=True)
            for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
                u, target = self.edges.sources[i], self.edges.targets[j]
                v = target_node(target)
                for node in (u, v):
                    if node not in g:
                        layer = rank[node] if node in rank else 2 * int(node[1:].split(".")[0]) + 1
                        g.add_node(node, layer=layer, in_circuit=inside)
                score = float(self.edges.scores[i, j])
                part = target[len(v) + 1:-1] if "<" in target else ""
                if g.has_edge(u, v) and g[u][v]["in_circuit"] == inside:
                    g[u][v]["score"] += score
                    g[u][v]["readers"] = ",".join(filter(None, [g[u][v]["readers"], part]))
                elif not g.has_edge(u, v):
                    g.add_edge(u, v, score=score, readers=part, in_circuit=inside)
        return g

    def plot(self, ax=None, *, context: int = 0, title: str | None = None, max_width: float = 6.0):
        """Draw the circuit with networkx: nodes in residual order (left to right), edge width ∝ |score|,
        red = positive score, blue = negative; ``context=k`` also draws the k strongest edges outside the
        circuit, thin, dashed and grey, so the circuit stands out. Returns the matplotlib Figure."""
        import matplotlib.pyplot as plt
        import networkx as nx

        g = self.to_networkx(context)
        if ax is None:
            n_columns = len({d["layer"] for _, d in g.nodes(data=True)})
            _, ax = plt.subplots(figsize=(max(6.0, 0.8 * n_columns + 2), 6))
        if g.number_of_nodes() == 0:
            ax.set_title(title or "empty circuit")
            ax.axis("off")
            return ax.figure
        pos = nx.multipartite_layout(g, subset_key="layer")
        top = max(abs(d["score"]) for _, _, d in g.edges(data=True)) or 1.0
        for inside in (False, True):
            edges = [(u, v) for u, v, d in g.edges(data=True) if d["in_circuit"] == inside]
            scores = [g[u][v]["score"] for u, v in edges]
            nx.draw_networkx_edges(
                g, pos, edgelist=edges, ax=ax, node_size=500, arrows=True, arrowsize=8,
                connectionstyle="arc3,rad=0.08",
                width=[0.3 + max_width * abs(s) / top for s in scores] if inside else 0.6,
                edge_color=["tab:red" if s > 0 else "tab:blue" for s in scores] if inside else "#bbbbbb",
                style="solid" if inside else "dashed", alpha=0.75 if inside else 0.6)
        colors = [("#f2c14e" if n.startswith("a") else "#8fb8de" if n.startswith("m") else "#cccccc")
                  if d["in_circuit"] else "#eeeeee" for n, d in g.nodes(data=True)]
        nx.draw_networkx_nodes(g, pos, ax=ax, node_color=colors, node_size=500, edgecolors="black", linewidths=0.5)
        nx.draw_networkx_labels(g, pos, ax=ax, font_size=7)
        n_nodes = sum(1 for _, d in g.nodes(data=True) if d["in_circuit"])
        ax.set_title(title or f"{self.edges.method}: {self.n_edges} edges, {n_nodes} nodes")
        ax.axis("off")
        return ax.figure


# --------------------------------------------------------------------------------------
# Faithfulness curve, CPR, CMD
# --------------------------------------------------------------------------------------


def trapezoid(x: Sequence[float], y: Sequence[float]) -> float:
    """``Σ_i (x_{i+1} − x_i) (y_i + y_{i+1}) / 2``."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need two or more (x, y) points of equal count, got {len(x)} and {len(y)}")
    return float(sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(len(x) - 1)))


def cpr(fractions: Sequence[float], faithfulness: Sequence[float]) -> float:
    """Area under the faithfulness curve over the edge fraction (trapezoid rule); higher is better."""
    return trapezoid(fractions, list(faithfulness))


def cmd(fractions: Sequence[float], faithfulness: Sequence[float]) -> float:
    """Area under ``|1 − f|`` over the edge fraction (trapezoid rule); lower is better."""
    return trapezoid(fractions, [abs(1.0 - f) for f in faithfulness])


@dataclass
class FaithfulnessCurve:
    """``f(top n edges)`` at each edge fraction, with the metric values behind it."""

    fractions: list[float]
    n_requested: list[int]           # int(fraction × edges), before pruning
    n_edges: list[int]               # edges left after pruning
    metric: list[float]              # m(C) for each circuit
    clean: float                     # m(all edges)
    corrupt: float                   # m(no edge)
    total_edges: int
    method: str

    @property
    def faithfulness(self) -> list[float]:
        span = self.clean - self.corrupt
        if span == 0:
            raise ValueError("m(full) = m(∅): the clean and corrupt prompts give the same metric, so faithfulness "
                             "is undefined; choose a corruption that changes the metric")
        return [(m - self.corrupt) / span for m in self.metric]

    @property
    def cpr(self) -> float:
        return cpr(self.fractions, self.faithfulness)

    @property
    def cmd(self) -> float:
        return cmd(self.fractions, self.faithfulness)

    def __repr__(self) -> str:
        return (f"FaithfulnessCurve({self.method}, {len(self.fractions)} points, CPR {self.cpr:.3f}, "
                f"CMD {self.cmd:.3f})")

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"fraction": self.fractions, "n_requested": self.n_requested, "n_edges": self.n_edges,
                             "metric": self.metric, "faithfulness": self.faithfulness, "method": self.method})

    def plot(self, ax=None, *, label: str | None = None, **kwargs):
        """Faithfulness against the edge fraction (log x axis); returns the matplotlib Figure."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.fractions, self.faithfulness, marker="o",
                label=label or f"{self.method} (CPR {self.cpr:.2f}, CMD {self.cmd:.2f})", **kwargs)
        ax.set_xscale("log")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel("fraction of edges kept")
        ax.set_ylabel("faithfulness f(C)")
        ax.legend(fontsize=8)
        return ax.figure


def faithfulness_curve(
    model,
    edges: EdgeResult,
    clean: Int[Tensor, "batch pos"],
    corrupt: Int[Tensor, "batch pos"],
    metric: Metric,
    *,
    fractions: Sequence[float] = MIB_FRACTIONS,
    absolute: bool = True,
    attention_mask: Tensor | None = None,
    baselines: tuple[float, float] | None = None,
    progress: bool = True,
) -> FaithfulnessCurve:
    """Faithfulness of ``Circuit.top_n(edges, int(p · n_edges))`` for each fraction ``p`` (MIB's by default).

    ``m(full)`` and ``m(∅)`` are the patched runs with all and with no edges (the clean and corrupt runs);
    pass ``baselines=(m_full, m_empty)`` from an earlier curve on the same prompts to skip them. One corrupt
    forward pass, then one patched forward pass per circuit (none for a circuit of all edges, whose value
    is ``m(full)``), each batched over the prompts.
    """
    from tqdm.auto import tqdm

    fractions = [float(p) for p in fractions]
    if not fractions or any(not 0.0 < p <= 1.0 for p in fractions) or fractions != sorted(fractions):
        raise ValueError(f"fractions must be increasing values in (0, 1], got {fractions}")
    graph = graph_of(edges)
    patcher = _Patcher.build(model, graph, clean, corrupt, attention_mask)

    def value(keep: Tensor) -> float:
        return float(_scalar(metric(patcher.run(keep))))

    total = edges.n_edges
    if baselines is None:
        full, empty = value(graph.edge_mask()), value(torch.zeros_like(graph.edge_mask()))
    else:
        full, empty = (float(v) for v in baselines)
    requested, kept, values = [], [], []
    for p in tqdm(fractions, desc=f"faithfulness ({edges.method})", disable=not progress):
        n = int(p * total)
        circuit = Circuit.top_n(edges, n, absolute=absolute)
        requested.append(n)
        kept.append(circuit.n_edges)
        values.append(full if circuit.n_edges == total else value(circuit.keep))
    return FaithfulnessCurve(fractions, requested, kept, values, full, empty, total, edges.method)


def random_edges(edges: EdgeResult, seed: int = 0) -> EdgeResult:
    """The same graph with uniform random scores: the random-ranking baseline."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(edges.scores.shape, generator=g).masked_fill(edges.scores.isnan(), float("nan"))
    return EdgeResult(scores, list(edges.sources), list(edges.targets), "random")


def plot_curves(curves: Sequence[FaithfulnessCurve], ax=None, *, title: str | None = None):
    """Several faithfulness curves on one log-x Axes, labelled with their CPR and CMD; returns the Figure."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    for curve in curves:
        curve.plot(ax)
    if title:
        ax.set_title(title)
    return ax.figure
