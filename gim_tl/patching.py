"""Attribution patching (AtP), edge attribution patching (EAP) and activation patching, with GIM gradients.

Activation patching runs the clean prompt with one activation ``a`` replaced by its value on a
corrupt prompt and measures ``metric(patched) − metric(clean)``. Attribution patching estimates all of
those effects at once with the first-order term

    AtP(a) = Σ_pos (a_corrupt − a_clean) · ∂metric/∂a   (gradient at the clean run)

and here ``∂/∂a`` is the gradient of any :class:`~gim_tl.hookset.GIMHookSet`: full GIM by default,
``GIMHookSet.preset("plain")`` for plain AtP. EAP scores the edges of the residual-stream graph:

    EAP(u → v) = Σ_pos (u_corrupt − u_clean) · ∂metric/∂(input of v)

for every writer ``u`` (the embeddings ``input``, each head ``a{l}.h{h}``, each MLP ``m{l}``) and every
reader ``v`` downstream of it (each head's query, key and value input ``a{l}.h{h}<q>``, each MLP input
``m{l}``, and ``logits``, the final residual stream). Names follow hannamw/EAP-IG.

Conventions
    * Noising direction: clean run, gradient at the clean run, corrupt − clean. (TransformerLens'
      ``attribution_patch`` takes the other direction: gradient at the corrupt run, clean − corrupt;
      pass the prompts swapped to compare.)
    * Scores sum ``Δ · ∇metric`` over batch and positions. With a batch-mean metric such as
      :func:`logit_diff_metric`, that is the batch average of the per-prompt scores (EAP's convention),
      and it estimates :func:`activation_patching`'s effect, which uses the same metric.
    * Padding positions (``attention_mask == 0``) contribute nothing.

Composing GIM with other code
    Any gradient code run inside ``hook_set.attach(model)`` (forward *and* backward inside) reads GIM
    gradients (the library's own :func:`atp` / :func:`eap` called there use that set as it is, see
    :mod:`gim_tl.stacking`): TransformerLens' own ``transformer_lens.tools.analysis.attribution_patch`` (node
    granularity) and EAP-IG-style code with its own read-only backward hooks both compose (both are
    tested). Exception: on a ``TransformerBridge``, TL's split q/k/v inputs
    (``set_use_split_qkv_input(True)``, used by TL's *edge*-granularity ``attribution_patch``) re-apply ln1
    per head through the raw HF module, outside ln1's hook points, so GIM's norm freeze cannot act there
    and ``hook_set.verify()`` raises. :func:`eap` therefore derives per-head inputs on bridges itself.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from gim_tl import stacking
from gim_tl.config import PRESET_LABELS, PRESETS, GIMConfig
from gim_tl.hookset import GIMHookSet
from gim_tl.layout import GIMModelError, model_kind

Metric = Callable[[Tensor], Tensor]
Component = Literal["attn_head", "mlp_neuron", "attn_out", "mlp_out", "resid_pre"]
COMPONENTS: tuple[str, ...] = ("attn_head", "mlp_neuron", "attn_out", "mlp_out", "resid_pre")
QKVInputs = Literal["auto", "split", "derived"]
GQAReaders = Literal["auto", "ungrouped", "grouped"]


# --------------------------------------------------------------------------------------
# Metric
# --------------------------------------------------------------------------------------


def logit_diff_metric(answer_ids, wrong_ids, position: int = -1) -> Metric:
    """``metric(logits)`` = batch mean of ``logit[answer] − logit[wrong]`` at ``position``.

    ``answer_ids`` / ``wrong_ids``: one token id per prompt (a sequence or 1-D tensor) or a single int for all.
    """
    answer = torch.as_tensor(answer_ids, dtype=torch.long).reshape(-1)
    wrong = torch.as_tensor(wrong_ids, dtype=torch.long).reshape(-1)

    def metric(logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, ""]:
        at = logits[:, position].float()
        batch = at.shape[0]
        for name, ids in (("answer_ids", answer), ("wrong_ids", wrong)):
            if ids.numel() not in (1, batch):
                raise ValueError(f"{name} has {ids.numel()} ids for a batch of {batch} prompts; give one per prompt")
        a = answer.to(at.device).expand(batch)
        w = wrong.to(at.device).expand(batch)
        rows = torch.arange(batch, device=at.device)
        return (at[rows, a] - at[rows, w]).mean()

    return metric


def _scalar(value: Tensor) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"the metric must return a scalar tensor (e.g. a batch mean), got {shape}")
    return value.reshape(())


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass
class PatchingResult:
    """Scores of one component family with named axes, e.g. ``("layer", "head")`` → ``[n_layers, n_heads]``.

    ``labels`` optionally maps an axis to display labels (e.g. ``"pos"`` → the tokens).
    """

    scores: Tensor
    axes: tuple[str, ...]
    component: str
    method: str
    labels: dict[str, list] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scores.ndim != len(self.axes):
            raise ValueError(f"scores have {self.scores.ndim} dims but axes are {self.axes}")
        for axis, labels in self.labels.items():
            if axis not in self.axes or len(labels) != self.scores.shape[self.axes.index(axis)]:
                raise ValueError(f"labels for axis {axis!r} do not match the scores' shape {tuple(self.scores.shape)}")

    def __repr__(self) -> str:
        dims = ", ".join(f"{a}={n}" for a, n in zip(self.axes, self.scores.shape, strict=True))
        return f"PatchingResult({self.method}, {self.component}, {dims})"

    def _label(self, axis: str, index: int):
        return self.labels[axis][index] if axis in self.labels else index

    def with_labels(self, axis: str, labels: Sequence) -> PatchingResult:
        """A copy with display labels for ``axis`` (e.g. the prompt's tokens for ``"pos"``)."""
        return PatchingResult(self.scores, self.axes, self.component, self.method, {**self.labels, axis: list(labels)})

    def sum(self, axis: str) -> PatchingResult:
        """Sum out one axis (e.g. ``"pos"``)."""
        dim = self.axes.index(axis)
        labels = {a: v for a, v in self.labels.items() if a != axis}
        return PatchingResult(self.scores.sum(dim), self.axes[:dim] + self.axes[dim + 1:], self.component,
                              self.method, labels)

    def top_k(self, k: int = 10, *, absolute: bool = True) -> list[dict]:
        """The ``k`` largest scores as labelled rows ``{axis: label, ..., "score": s}``.

        ``absolute=True`` ranks by ``|score|``; ``False`` by signed score (largest first).
        """
        flat = self.scores.flatten().float()
        key = torch.nan_to_num(flat.abs() if absolute else flat, nan=-math.inf)
        order = key.argsort(descending=True, stable=True)[: max(0, k)]
        rows = []
        for i in order.tolist():
            index = torch.unravel_index(torch.tensor(i), tuple(self.scores.shape))
            row = {axis: self._label(axis, int(j)) for axis, j in zip(self.axes, index, strict=True)}
            row["score"] = float(flat[i])
            rows.append(row)
        return rows

    def to_dataframe(self):
        """Long format: one column per axis, plus ``score``, ``component`` and ``method``."""
        import pandas as pd

        grids = torch.meshgrid(*[torch.arange(n) for n in self.scores.shape], indexing="ij")
        data = {axis: [self._label(axis, int(j)) for j in grid.flatten()]
                for axis, grid in zip(self.axes, grids, strict=True)}
        data["score"] = self.scores.flatten().float().tolist()
        frame = pd.DataFrame(data)
        frame["component"] = self.component
        frame["method"] = self.method
        return frame

    def plot(self, ax=None, *, title: str | None = None):
        """Heatmap (2-D, diverging colormap centred at 0) or line per layer (1-D).

        Returns the matplotlib ``Figure``, as every ``plot()`` in gim_tl does (``fig.axes[0]`` is the plot;
        ``ax.figure`` when ``ax`` is given). Earlier versions returned the Axes.
        """
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4) if self.scores.ndim == 1 else (7, 5))
        data = self.scores.detach().float().cpu()
        if data.ndim == 1:
            ax.plot(range(len(data)), data.numpy(), marker="o")
            ax.axhline(0.0, color="grey", lw=0.8)
            ax.set_xlabel(self.axes[0])
            ax.set_ylabel("score")
            if self.axes[0] in self.labels:
                ax.set_xticks(range(len(data)), [str(v) for v in self.labels[self.axes[0]]], rotation=90)
        elif data.ndim == 2:
            vmax = float(torch.nan_to_num(data).abs().max()) or 1.0
            image = ax.imshow(data.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto",
                              interpolation="nearest")
            ax.figure.colorbar(image, ax=ax, label="score")
            ax.set_ylabel(self.axes[0])
            ax.set_xlabel(self.axes[1])
            for axis, set_ticks in ((self.axes[0], ax.set_yticks), (self.axes[1], ax.set_xticks)):
                if axis in self.labels:
                    n = data.shape[self.axes.index(axis)]
                    set_ticks(range(n), [str(v) for v in self.labels[axis]],
                              **({"rotation": 90} if set_ticks == ax.set_xticks else {}))
        else:
            raise ValueError(f"cannot plot {data.ndim}-D scores {self.axes}: reduce an axis first, e.g. .sum('pos')")
        ax.set_title(title or f"{self.method}: {self.component}")
        return ax.figure


@dataclass
class EdgeResult:
    """EAP scores as a ``[source, target]`` matrix; NaN where the source does not feed the target."""

    scores: Tensor
    sources: list[str]
    targets: list[str]
    method: str

    def __post_init__(self) -> None:
        if tuple(self.scores.shape) != (len(self.sources), len(self.targets)):
            raise ValueError(f"scores {tuple(self.scores.shape)} do not match {len(self.sources)} sources "
                             f"× {len(self.targets)} targets")

    def __repr__(self) -> str:
        return (f"EdgeResult({self.method}, {len(self.sources)} sources, {len(self.targets)} targets, "
                f"{self.n_edges} edges)")

    @property
    def n_edges(self) -> int:
        return int((~self.scores.isnan()).sum())

    def score(self, source: str, target: str) -> float:
        """The score of the edge ``source → target`` (NaN if there is no such edge)."""
        return float(self.scores[self.sources.index(source), self.targets.index(target)])

    def top_k(self, k: int = 10, *, absolute: bool = True) -> list[dict]:
        """The ``k`` strongest edges as rows ``{"source", "target", "edge", "score"}``."""
        flat = self.scores.flatten().float()
        key = torch.nan_to_num(flat.abs() if absolute else flat, nan=-math.inf)
        order = key.argsort(descending=True, stable=True)[: min(max(0, k), self.n_edges)]
        n_t = len(self.targets)
        return [{"source": self.sources[i // n_t], "target": self.targets[i % n_t],
                 "edge": f"{self.sources[i // n_t]}->{self.targets[i % n_t]}", "score": float(flat[i])}
                for i in order.tolist()]

    def source_totals(self) -> dict[str, float]:
        """Σ over targets per source: the writer's node score (equals its AtP score, see :func:`eap`)."""
        return dict(zip(self.sources, torch.nansum(self.scores, 1).tolist(), strict=True))

    def target_totals(self) -> dict[str, float]:
        """Σ over sources per target: ``(Δ residual at the target) · ∂metric/∂(target input)``."""
        return dict(zip(self.targets, torch.nansum(self.scores, 0).tolist(), strict=True))

    def to_dataframe(self):
        """One row per edge: ``source``, ``target``, ``edge`` (``"a0.h1->m2"``), ``score``, ``method``."""
        import pandas as pd

        frame = pd.DataFrame(self.top_k(self.n_edges, absolute=False))
        frame["method"] = self.method
        return frame

    def plot(self, ax=None, *, title: str | None = None):
        """Heatmap of the score matrix (sources × targets, diverging colormap centred at 0); returns the Figure."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(10, 6))
        data = self.scores.detach().float().cpu()
        vmax = float(torch.nan_to_num(data).abs().max()) or 1.0
        image = ax.imshow(data.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.figure.colorbar(image, ax=ax, label="score")
        if len(self.sources) <= 60:
            ax.set_yticks(range(len(self.sources)), self.sources, fontsize=6)
        if len(self.targets) <= 80:
            ax.set_xticks(range(len(self.targets)), self.targets, fontsize=6, rotation=90)
        ax.set_ylabel("source (writer)")
        ax.set_xlabel("target (reader)")
        ax.set_title(title or self.method)
        return ax.figure


# --------------------------------------------------------------------------------------
# Shared plumbing
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    hook: str           # hook name with "{}" for the layer
    unit: str | None    # per-layer unit axis ("head", "neuron") or None
    feature_dim: bool   # the activation has a trailing feature dim to contract (d_head / d_model)


_SPECS: dict[str, _Spec] = {
    "attn_head": _Spec("blocks.{}.attn.hook_z", "head", True),
    "mlp_neuron": _Spec("blocks.{}.mlp.hook_post", "neuron", False),
    "attn_out": _Spec("blocks.{}.hook_attn_out", None, True),
    "mlp_out": _Spec("blocks.{}.hook_mlp_out", None, True),
    "resid_pre": _Spec("blocks.{}.hook_resid_pre", None, True),
}


def _spec(component: str) -> _Spec:
    if component not in _SPECS:
        raise ValueError(f"unknown component {component!r}; choose from {COMPONENTS}")
    return _SPECS[component]


def method_name(prefix: str, method: str, attached: bool = False) -> str:
    """The label of a method (see :data:`gim_tl.stacking.GRADIENT_METHODS`): ``"AtP-GIM"``, ``"AtP"``
    (``"grad_x_input"``: plain gradients), ``"AtP (+ LN freeze)"`` etc. for the other presets,
    ``"AtP (custom GIM)"``; `` (attached set)`` appended when the GIM set already on the model was used."""
    if method == "gim":
        label = f"{prefix}-GIM"
    elif method == stacking.PLAIN_METHOD:
        label = prefix
    elif method in PRESET_LABELS:
        label = f"{prefix} ({PRESET_LABELS[method]})"
    else:
        label = f"{prefix} (custom GIM)"
    return label + (" (attached set)" if attached else "")


def components_arg(components: str | Sequence[str], where: str) -> tuple[list[str], bool]:
    """``(component names, single)`` from a name or a sequence of names; ``single`` when one name was given."""
    if isinstance(components, str):
        return [components], True
    if not isinstance(components, Sequence) or not components or not all(isinstance(c, str) for c in components):
        raise TypeError(f"{where}: components must be a component name or a non-empty sequence of names from "
                        f"{COMPONENTS}, got {components!r}")
    return list(components), False


def _gradient_set(model, method: str, hook_set: GIMHookSet | None, where: str
                  ) -> tuple[str, GIMHookSet | None, bool]:
    """``(method, set to run with or None for plain autograd, whether it is the set already on the model)``.

    ``hook_set=None`` means ``method``'s set, as in :func:`gim_tl.attribution.attribute_tokens`; a set
    already on the model is used if it has those rules, else :class:`~gim_tl.stacking.GIMStackingError`.
    """
    stacking.refuse_meta(model)
    method = stacking.canonical_method(method, stacklevel=4)   # a deprecated name warns at the user's call
    method, run_set = stacking.resolve_method(method, hook_set)
    run_set, attached = stacking.use_or_refuse(model, run_set, f"{where}(method={method!r})")
    return method, run_set, attached


def _check_pair(clean: Tensor, corrupt: Tensor, attention_mask: Tensor | None) -> Tensor | None:
    """Validate the token tensors; return the mask to pass to the model (None when nothing is padded)."""
    if clean.ndim != 2 or clean.shape != corrupt.shape:
        raise ValueError(f"clean and corrupt must be [batch, pos] token tensors of equal shape, got "
                         f"{tuple(clean.shape)} and {tuple(corrupt.shape)}; pair prompts of equal token length")
    if attention_mask is None:
        return None
    if attention_mask.shape != clean.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match the tokens {tuple(clean.shape)}")
    return None if bool(attention_mask.all()) else attention_mask.long()


def _position_weights(mask: Tensor | None, tokens: Tensor) -> Float[Tensor, "batch pos"]:
    if mask is None:
        return torch.ones(tokens.shape, dtype=torch.float32, device=tokens.device)
    return mask.float()


def _forward(model, tokens: Tensor, mask: Tensor | None) -> Tensor:
    return model(tokens) if mask is None else model(tokens, attention_mask=mask)


def _caching_hook(store: dict[str, Tensor], key: str) -> Callable:
    def hook(x, hook):
        store[key] = x.detach()
        return None

    return hook


def _cache_activations(model, tokens: Tensor, mask: Tensor | None, names: Sequence[str]) -> dict[str, Tensor]:
    """One no-grad forward; the activations at ``names``."""
    acts: dict[str, Tensor] = {}
    with torch.no_grad(), model.hooks(fwd_hooks=[(n, _caching_hook(acts, n)) for n in names]):
        _forward(model, tokens, mask)
    _require_fired(acts, names, "forward")
    return acts


def _require_fired(store: dict, names: Sequence[str], what: str) -> None:
    missing = [n for n in names if n not in store]
    if missing:
        raise GIMModelError(f"these hook points did not fire in the {what} pass: {missing[:6]}"
                            f"{' …' if len(missing) > 6 else ''}. Check that the model has them "
                            "(model.hook_dict) and that the metric depends on every layer.")


def _clean_run(model, tokens: Tensor, mask: Tensor | None, metric: Metric, act_names: Sequence[str],
               grad_names: Sequence[str], hook_set: GIMHookSet | None,
               after_backward: Callable[[dict, dict], None] | None = None, attached: bool = False,
               ) -> tuple[dict[str, Tensor], dict[str, Tensor], float]:
    """Clean forward and backward with ``hook_set`` attached; activations and gradients at the named points.

    ``hook_set`` None: plain autograd. ``attached``: the set is already on the model (used as it is).

    The ``hook_embed`` output becomes a fresh leaf so ``torch.autograd.grad`` drives the backward through
    every layer without touching parameter ``.grad``. Gradients are read by read-only backward hooks.
    ``after_backward(acts, grads)`` runs inside the same hook context (extra VJPs that must see GIM's rules).
    """
    acts: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}
    leaf: dict[str, Tensor] = {}

    def make_leaf(x, hook):
        leaf["embed"] = x.detach().requires_grad_(True)
        return leaf["embed"]

    def grad_hook(key: str) -> Callable:
        def hook(g, hook):
            grads[key] = g.detach()
            return None

        return hook

    fwd = [("hook_embed", make_leaf)] + [(n, _caching_hook(acts, n)) for n in act_names]
    bwd = [(n, grad_hook(n)) for n in grad_names]
    if hook_set is not None:
        hook_set.reset_counts()
    attach = contextlib.nullcontext() if hook_set is None or attached else hook_set.attach(model)
    with torch.enable_grad(), attach, model.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
        value = _scalar(metric(_forward(model, tokens, mask)))
        if "embed" not in leaf:
            raise GIMModelError("hook_embed did not fire: the model's forward does not pass through its embedding")
        torch.autograd.grad(value, [leaf["embed"]])
        if after_backward is not None:
            after_backward(acts, grads)
    if hook_set is not None:
        hook_set.verify()
    _require_fired(acts, act_names, "clean forward")
    _require_fired(grads, grad_names, "backward")
    return acts, grads, float(value.detach())


# --------------------------------------------------------------------------------------
# Attribution patching (nodes)
# --------------------------------------------------------------------------------------


def contribution(delta: Tensor, grad: Tensor, weights: Float[Tensor, "batch pos"], feature_dim: bool
                 ) -> Float[Tensor, "pos ..."]:
    """``Σ_batch weights · (Δ · g)`` in fp32, contracting the trailing feature dim if ``feature_dim``."""
    prod = delta.float() * grad.float()
    if feature_dim:
        prod = prod.sum(-1)
    w = weights.reshape(*weights.shape, *([1] * (prod.ndim - 2)))
    return (prod * w).sum(0)


def atp(
    model,
    clean: Int[Tensor, "batch pos"],
    corrupt: Int[Tensor, "batch pos"],
    metric: Metric,
    components: str | Sequence[str] = ("attn_head", "mlp_out"),
    *,
    method: str = "gim",
    hook_set: GIMHookSet | None = None,
    attention_mask: Tensor | None = None,
    per_position: bool = False,
) -> dict[str, PatchingResult] | PatchingResult:
    """Attribution patching: ``Σ (a_corrupt − a_clean) · ∂metric/∂a`` per component, GIM gradient at the clean run.

    Args:
        model: a HookedTransformer or TransformerBridge (eval mode).
        clean, corrupt: token tensors of equal shape, prompt pairs row by row.
        metric: ``metric(logits [batch, pos, vocab]) -> scalar`` (e.g. :func:`logit_diff_metric`).
        components: any of ``"attn_head"`` (``attn.hook_z``, per layer × head), ``"mlp_neuron"``
            (``mlp.hook_post``, layer × neuron), ``"attn_out"`` / ``"mlp_out"`` (per layer) and
            ``"resid_pre"`` (``hook_resid_pre``, always per layer × position). One name (a string) gives
            one :class:`PatchingResult`, a sequence a dict, as in :func:`activation_patching`.
        method: the gradient: ``"gim"`` (default), any GIM preset (``"tsg"``, ...), or ``"grad_x_input"``
            for plain AtP (``"plain"``: deprecated old name).
        hook_set: None (as in :func:`~gim_tl.attribution.attribute_tokens`): the set of ``method``; or a
            :class:`GIMHookSet` whose rules to use instead (``method`` left at its default).
        attention_mask: ``[batch, pos]``, 0 on padding (shared by the clean and corrupt prompts).
        per_position: keep a ``"pos"`` axis (``[layer, pos, head]`` etc.) instead of summing positions.

    Returns:
        ``{component: PatchingResult}`` (one ``PatchingResult`` if ``components`` is a string); one
        forward+backward (clean) and one forward (corrupt) in all. With a GIM set already on the model, see
        :func:`gim_tl.stacking.use_or_refuse`: it is used if it has ``method``'s rules (the label says
        "(attached set)"), else :class:`~gim_tl.stacking.GIMStackingError`.
    """
    names_given, single = components_arg(components, "atp")
    method, run_set, attached = _gradient_set(model, method, hook_set, "atp")
    mask = _check_pair(clean, corrupt, attention_mask)
    specs = {c: _spec(c) for c in names_given}
    n_layers = int(model.cfg.n_layers)
    names = list(dict.fromkeys(s.hook.format(layer) for s in specs.values() for layer in range(n_layers)))
    acts, grads, _ = _clean_run(model, clean, mask, metric, names, names, run_set, attached=attached)
    corrupt_acts = _cache_activations(model, corrupt, mask, names)
    weights = _position_weights(mask, clean)
    label = method_name("AtP", method, attached)
    results = {}
    for component, spec in specs.items():
        per_layer = []
        for layer in range(n_layers):
            name = spec.hook.format(layer)
            per_layer.append(contribution(corrupt_acts[name] - acts[name], grads[name], weights, spec.feature_dim))
        scores = torch.stack(per_layer).cpu()   # [layer, pos, (unit)]
        axes = ("layer", "pos") + ((spec.unit,) if spec.unit else ())
        if not per_position and component != "resid_pre":
            scores, axes = scores.sum(1), tuple(a for a in axes if a != "pos")
        results[component] = PatchingResult(scores, axes, component, label)
    return results[names_given[0]] if single else results


# --------------------------------------------------------------------------------------
# Edge attribution patching
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EdgeGraph:
    """Writers (sources) and readers (targets) of the residual-stream graph, with hannamw/EAP-IG names."""

    n_layers: int
    n_heads: int
    n_kv_heads: int

    @property
    def sources(self) -> list[str]:
        names = ["input"]
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}" for h in range(self.n_heads)] + [f"m{layer}"]
        return names

    def _kv_name(self, layer: int, g: int) -> str:
        return f"a{layer}.h{g}" if self.n_kv_heads == self.n_heads else f"a{layer}.kv{g}"

    @property
    def targets(self) -> list[str]:
        names = []
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}<q>" for h in range(self.n_heads)]
            names += [f"{self._kv_name(layer, g)}<k>" for g in range(self.n_kv_heads)]
            names += [f"{self._kv_name(layer, g)}<v>" for g in range(self.n_kv_heads)]
            names.append(f"m{layer}")
        return names + ["logits"]

    def edge_mask(self) -> torch.Tensor:
        """``[source, target]`` True where the source writes into the residual stream the target reads.

        Residual order: input = 0, layer l's heads = 2l + 1, its MLP = 2l + 2. Layer l's attention
        readers see order ≤ 2l, its MLP reader order ≤ 2l + 1, the logits everything.
        """
        src = [0] + [o for layer in range(self.n_layers) for o in [2 * layer + 1] * self.n_heads + [2 * layer + 2]]
        per_attn = self.n_heads + 2 * self.n_kv_heads
        tgt = [o for layer in range(self.n_layers) for o in [2 * layer] * per_attn + [2 * layer + 1]]
        tgt.append(2 * self.n_layers)
        return torch.tensor(src)[:, None] <= torch.tensor(tgt)[None, :]


def _refuse_non_additive(model) -> None:
    cfg = model.cfg
    if getattr(cfg, "use_normalization_before_and_after", False) or any(
            ".ln1_post." in n or ".ln2_post." in n for n in model.hook_dict):
        raise GIMModelError("EAP needs each head's and MLP's output added to the residual stream as is; this "
                            "model normalizes them first (Gemma-2 post-norms), so edges are not additive. Use atp().")
    if getattr(cfg, "parallel_attn_mlp", False):
        raise GIMModelError("EAP here supports sequential blocks; this model runs attention and MLP in parallel.")


@contextlib.contextmanager
def _split_inputs(model, on: bool) -> Iterator[None]:
    """Turn on TL's split q/k/v inputs for the block, restoring the caller's flags afterwards."""
    if not on:
        yield
        return
    cfg = model.cfg
    saved_split = bool(getattr(cfg, "use_split_qkv_input", False))
    saved_attn_in = bool(getattr(cfg, "use_attn_in", False))
    try:
        if saved_attn_in:
            model.set_use_attn_in(False)
        model.set_use_split_qkv_input(True)
        yield
    finally:
        model.set_use_split_qkv_input(saved_split)
        if saved_attn_in:
            model.set_use_attn_in(True)


def is_grouped(model) -> bool:
    """True for grouped-query attention (fewer key/value heads than query heads)."""
    n_kv = getattr(model.cfg, "n_key_value_heads", None)
    return n_kv is not None and int(n_kv) < int(model.cfg.n_heads)


def resolve_gqa(model, gqa: str) -> bool:
    """Whether k/v readers are per query head (``True``: ungrouped, MIB's graph) or per KV head.

    ``"auto"`` is ungrouped on a HookedTransformer (TL's ``ungroup_grouped_query_attention``) and grouped on
    a TransformerBridge, which has no ungrouped mode; for multi-head attention both graphs are the same.
    """
    if gqa not in ("auto", "ungrouped", "grouped"):
        raise ValueError(f"gqa must be 'auto', 'ungrouped' or 'grouped', got {gqa!r}")
    if not is_grouped(model):
        return False
    kind = model_kind(model)
    if gqa == "ungrouped" and kind != "hooked":
        raise GIMModelError("ungrouped GQA readers (one k/v input per query head) need TL 3.9's HookedTransformer "
                            "(its ungroup_grouped_query_attention); a TransformerBridge has no such mode. Use "
                            "gqa='grouped' (one k/v reader per KV head), or load_model(backend='hooked').")
    return gqa == "ungrouped" or (gqa == "auto" and kind == "hooked")


@contextlib.contextmanager
def _ungrouped(model, on: bool) -> Iterator[None]:
    """Turn on TL's ``ungroup_grouped_query_attention`` (k, v computed per query head), restoring it afterwards."""
    if not on:
        yield
        return
    saved = bool(model.cfg.ungroup_grouped_query_attention)
    try:
        model.set_ungroup_grouped_query_attention(True)
        yield
    finally:
        model.set_ungroup_grouped_query_attention(saved)


def _head_weight(attn, which: str, n_heads: int) -> Float[Tensor, "head d_model d_head"]:
    """``W_Q`` / ``W_K`` / ``W_V`` (``[n, d_model, d_head]``) of one layer, per KV head for k and v under GQA."""
    w = getattr(attn, f"_W_{which}", None)   # HookedTransformer GQA keeps the un-repeated weight here
    if not isinstance(w, Tensor) or w.shape[0] != n_heads:   # ungrouped GQA: the repeated one
        w = getattr(attn, f"W_{which}")
    if w.shape[0] != n_heads:
        raise GIMModelError(f"W_{which} has {w.shape[0]} heads but hook_{which.lower()} has {n_heads}; "
                            "cannot split its input per head")
    return w


def _derived_qkv_grads(model, layer: int, x: Float[Tensor, "batch pos d_model"], grads: dict[str, Tensor],
                       config: GIMConfig) -> Float[Tensor, "batch pos reader d_model"]:
    """Per-head gradients at each head's q/k/v input (the residual before ln1), without split inputs.

    Head h's share of the gradient at ln1's output is ``s · W_Q[h] g_q[h]`` (``g_q`` = the gradient at
    ``hook_q``; ``s`` the GIM factor it does not carry yet, see ``GIMConfig.scale_after_hook``: 1 for q
    and k, whose factor sits on the score gradient, v's ½ for v; same for k, v per KV head). It is pulled
    back through ln1 by calling the model's own ln1 on per-head copies of the clean residual, inside the
    caller's hook context, so GIM's norm freeze applies exactly as in the model's backward.
    """
    attn = model.blocks[layer].attn
    parts = []
    for which in ("q", "k", "v"):
        g = grads[f"blocks.{layer}.attn.hook_{which}"].float()          # [batch, pos, n, d_head]
        w = _head_weight(attn, which.upper(), g.shape[2]).float()       # [n, d_model, d_head]
        scale = config.scale_after_hook(which)
        parts.append(scale * torch.einsum("bpne,nde->bpnd", g, w))
    cotangent = torch.cat(parts, dim=2)
    n = cotangent.shape[2]
    with torch.enable_grad():
        forks = x.detach().unsqueeze(2).expand(-1, -1, n, -1).contiguous().requires_grad_(True)
        out = model.blocks[layer].ln1(forks)
        (g_in,) = torch.autograd.grad(out, forks, cotangent.to(out.dtype))
    return g_in.float()


def eap(
    model,
    clean: Int[Tensor, "batch pos"],
    corrupt: Int[Tensor, "batch pos"],
    metric: Metric,
    *,
    method: str = "gim",
    hook_set: GIMHookSet | None = None,
    attention_mask: Tensor | None = None,
    qkv_inputs: QKVInputs = "auto",
    gqa: GQAReaders = "auto",
    ig_steps: int | None = None,
    progress: bool = False,
) -> EdgeResult:
    """Edge attribution patching with GIM gradients: ``Σ_batch,pos (u_corrupt − u_clean) · ∂metric/∂(v input)``.

    Writers ``u``: ``input`` (``blocks.0.hook_resid_pre``: token + position embeddings), each head
    (``hook_z[h] @ W_O[h]``), each MLP (``hook_mlp_out``). Readers ``v`` and the gradient used:

    * head q/k/v inputs: ``qkv_inputs="split"`` reads TL's split inputs (``hook_q_input`` …, flag set and
      restored); ``"derived"`` computes them without split inputs (see :func:`_derived_qkv_grads`).
      ``"auto"`` = split on HookedTransformer, derived on TransformerBridge (the bridge's split path
      bypasses ln1's hook points, so GIM's norm freeze would be lost there);
    * under grouped-query attention, ``gqa="ungrouped"`` gives every query head its own k and v reader
      (TL's ``ungroup_grouped_query_attention``, the graph MIB evaluates), ``"grouped"`` one k and one v
      reader per KV head (named ``a{l}.kv{g}<k>``); ``"auto"`` = ungrouped on HookedTransformer, grouped on
      a TransformerBridge (no ungrouped mode there);
    * MLP input: ``∂/∂attn_out − ∂/∂resid_post`` (the MLP branch of the gradient at ``resid_mid``);
    * ``logits``: the gradient at the last ``hook_resid_post``.

    ``ig_steps=k`` gives EAP-IG on the inputs (Hanna et al. 2024): the reader gradients are averaged over
    k runs whose input (``blocks.0.hook_resid_pre``) is ``x_corrupt + (j/k)(x_clean − x_corrupt)``,
    j = 1…k (right Riemann sum, so ``ig_steps=1`` is plain EAP), each under ``hook_set``; the differences
    ``u_corrupt − u_clean`` stay those of the clean run.

    Identities (exact, tested): for every writer ``u``, ``Σ_v EAP(u → v)`` equals ``atp`` of ``u`` (the
    residual-stream gradient after ``u`` is the sum of its readers' gradients; no GIM rule sits on a
    residual add); for every reader ``v``, ``Σ_u EAP(u → v) = Σ Δ(residual at v) · ∂metric/∂(v input)``
    (the pre-norm residual is the sum of the writers plus constants that cancel in Δ).

    ``method`` and ``hook_set`` choose the gradient as in :func:`atp` (``hook_set=None``: ``method``'s set,
    full GIM by default), including the use of a GIM set already on the model.
    """
    method, run_set, attached = _gradient_set(model, method, hook_set, "eap")
    config = PRESETS["plain"] if run_set is None else run_set.config
    mask = _check_pair(clean, corrupt, attention_mask)
    _refuse_non_additive(model)
    kind = model_kind(model)
    if qkv_inputs not in ("auto", "split", "derived"):
        raise ValueError(f"qkv_inputs must be 'auto', 'split' or 'derived', got {qkv_inputs!r}")
    if ig_steps is not None and (not isinstance(ig_steps, int) or ig_steps < 1):
        raise ValueError(f"ig_steps must be a positive int (or None for plain EAP), got {ig_steps!r}")
    ungroup = resolve_gqa(model, gqa)
    split = qkv_inputs == "split" or (qkv_inputs == "auto" and kind == "hooked")
    if split and kind == "bridge" and config.freeze_norm:
        raise GIMModelError("on a TransformerBridge, split q/k/v inputs re-apply ln1 outside its hook points, so "
                            "GIM's norm freeze cannot act on them; use qkv_inputs='derived' (the default 'auto').")

    n_layers = int(model.cfg.n_layers)
    writers = ["blocks.0.hook_resid_pre"] + [f"blocks.{layer}.{p}" for layer in range(n_layers)
                                             for p in ("attn.hook_z", "hook_mlp_out")]
    # ∂/∂attn_out is the full gradient at resid_mid. (On a bridge, hook_resid_mid is ln2.hook_in: its
    # backward hook sees only the MLP branch.)
    resid = [f"blocks.{layer}.{p}" for layer in range(n_layers) for p in ("hook_attn_out", "hook_resid_post")]
    if split:
        readers = [f"blocks.{layer}.hook_{w}_input" for layer in range(n_layers) for w in "qkv"]
    else:
        readers = [f"blocks.{layer}.attn.hook_{w}" for layer in range(n_layers) for w in "qkv"]
    pre = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]

    def reader_gradients(step_hooks: list) -> tuple[dict, Tensor, int]:
        """One forward + backward under the run's GIM set (plus ``step_hooks``): writer activations and the
        ``[batch, pos, target, d_model]`` reader gradients."""
        derived: dict[int, Tensor] = {}

        def pull_back(acts: dict, grads: dict) -> None:  # inside the run's hook context, after its backward
            if not split:
                for layer in range(n_layers):
                    derived[layer] = _derived_qkv_grads(model, layer, acts[pre[layer]], grads, config)

        with model.hooks(fwd_hooks=step_hooks):
            acts, grads, _ = _clean_run(model, clean, mask, metric, list(dict.fromkeys(writers + pre)),
                                        readers + resid, run_set, pull_back, attached=attached)
        parts = []
        n_kv = 0
        for layer in range(n_layers):
            if split:
                qkv = [grads[f"blocks.{layer}.hook_{w}_input"].float() for w in "qkv"]
                n_kv = qkv[1].shape[2]
                parts.append(torch.cat(qkv, dim=2))
            else:
                n_kv = grads[f"blocks.{layer}.attn.hook_k"].shape[2]
                parts.append(derived[layer])
            mid, post = (grads[f"blocks.{layer}.hook_{p}"].float() for p in ("attn_out", "resid_post"))
            parts.append((mid - post)[:, :, None])
        parts.append(grads[f"blocks.{n_layers - 1}.hook_resid_post"].float()[:, :, None])
        return acts, torch.cat(parts, dim=2), int(n_kv)

    with _split_inputs(model, split), _ungrouped(model, ungroup):
        run_acts, target_grad, n_kv = reader_gradients([])       # the clean run (IG's last point, α = 1)
        corrupt_acts = _cache_activations(model, corrupt, mask, writers)
        if ig_steps is not None and ig_steps > 1:
            from tqdm.auto import tqdm

            x_clean, x_corrupt = run_acts[writers[0]], corrupt_acts[writers[0]]
            for j in tqdm(range(1, ig_steps), desc="EAP-IG steps", disable=not progress):
                point = x_corrupt + (j / ig_steps) * (x_clean - x_corrupt)

                def interpolate(x, hook, point=point):   # value = the IG point, gradient flows on to the leaf
                    return x + (point.to(x.dtype) - x).detach()

                target_grad = target_grad + reader_gradients([(writers[0], interpolate)])[1]
            target_grad = target_grad / ig_steps

    weights = _position_weights(mask, clean)[:, :, None, None]
    w_o = [model.blocks[layer].attn.W_O.float() for layer in range(n_layers)]   # [head, d_head, d_model]
    n_heads = run_acts[writers[1]].shape[2]
    deltas = [(corrupt_acts[writers[0]] - run_acts[writers[0]]).float()[:, :, None]]
    for layer in range(n_layers):
        dz = (corrupt_acts[f"blocks.{layer}.attn.hook_z"] - run_acts[f"blocks.{layer}.attn.hook_z"]).float()
        deltas.append(torch.einsum("bphe,hed->bphd", dz, w_o[layer]))
        deltas.append((corrupt_acts[f"blocks.{layer}.hook_mlp_out"] - run_acts[f"blocks.{layer}.hook_mlp_out"]
                       ).float()[:, :, None])
    source_delta = torch.cat(deltas, dim=2) * weights                      # [batch, pos, source, d_model]

    graph = EdgeGraph(n_layers, n_heads, n_kv)
    scores = torch.einsum("bpsd,bptd->st", source_delta, target_grad).cpu()
    scores = scores.masked_fill(~graph.edge_mask(), float("nan"))
    name = method_name("EAP-IG" if ig_steps is not None and ig_steps > 1 else "EAP", method, attached)
    return EdgeResult(scores, graph.sources, graph.targets, name)


# --------------------------------------------------------------------------------------
# Activation patching (ground truth)
# --------------------------------------------------------------------------------------

_PATCHABLE = ("attn_head", "attn_out", "mlp_out", "resid_pre")


def patch_units(component: str, n_layers: int, n_heads: int, n_pos: int, per_position: bool
                ) -> tuple[list[tuple[int, int | None]], tuple[str, ...], tuple[int, ...]]:
    """The interventions of a sweep as ``(layer, index)`` (head, position or None), with the result's axes/shape."""
    if component == "attn_head":
        return [(layer, h) for layer in range(n_layers) for h in range(n_heads)], ("layer", "head"), (n_layers, n_heads)
    if component == "resid_pre" and per_position:
        return [(layer, p) for layer in range(n_layers) for p in range(n_pos)], ("layer", "pos"), (n_layers, n_pos)
    return [(layer, None) for layer in range(n_layers)], ("layer",), (n_layers,)


def patched(clean_act: Tensor, corrupt_act: Tensor, component: str, index: int | None) -> Tensor:
    """``clean_act`` with the unit ``index`` (a head of ``hook_z``, a position, or all if None) taken from corrupt."""
    out = clean_act.clone()
    if index is None:
        out[:] = corrupt_act
    elif component == "attn_head":
        out[:, :, index] = corrupt_act[:, :, index]
    else:
        out[:, index] = corrupt_act[:, index]
    return out


def activation_patching(
    model,
    clean: Int[Tensor, "batch pos"],
    corrupt: Int[Tensor, "batch pos"],
    metric: Metric,
    components: str | Sequence[str] = "attn_head",
    *,
    attention_mask: Tensor | None = None,
    per_position: bool = True,
    interventions_per_pass: int | None = None,
    progress: bool = True,
    component: str | None = None,
) -> PatchingResult | dict[str, PatchingResult]:
    """Real interventions: ``metric(clean run with one unit from the corrupt run) − metric(clean run)``.

    ``components``: ``"attn_head"`` (``hook_z`` of one head, all positions; layer × head), ``"attn_out"`` /
    ``"mlp_out"`` (one layer, all positions) or ``"resid_pre"`` (layer × position; ``per_position=False``:
    all positions of a layer at once). As in :func:`atp`: one name gives one :class:`PatchingResult`, a
    sequence of names a dict. (``component=`` is the deprecated old keyword.)
    Several interventions run in one forward pass by stacking copies of the batch (``interventions_per_pass``
    copies, default ``max(1, 128 // batch)``); the metric is applied to
    each copy's logits separately, so it must depend on its own batch only.

    No gradient is taken, so a GIM set attached to the model changes nothing here (GIM leaves the
    forward pass bit-identical): it runs the same with or without one.
    """
    if component is not None:
        warnings.warn("activation_patching(component=...) is deprecated and will be removed in the next release; "
                      "use components=... (a name or a sequence of names, as in atp)", DeprecationWarning,
                      stacklevel=2)
        components = component
    names_given, single = components_arg(components, "activation_patching")
    bad = [c for c in names_given if c not in _PATCHABLE]
    if bad:
        raise ValueError(f"activation_patching supports {_PATCHABLE}, got {bad[0]!r}")
    stacking.refuse_meta(model)
    if not single:
        return {c: activation_patching(model, clean, corrupt, metric, c, attention_mask=attention_mask,
                                       per_position=per_position, interventions_per_pass=interventions_per_pass,
                                       progress=progress) for c in names_given}
    component = names_given[0]
    from tqdm.auto import tqdm

    mask = _check_pair(clean, corrupt, attention_mask)
    n_layers, batch, n_pos = int(model.cfg.n_layers), clean.shape[0], clean.shape[1]
    hook = _spec(component).hook
    names = [hook.format(layer) for layer in range(n_layers)]
    corrupt_acts = _cache_activations(model, corrupt, mask, names)
    n_heads = corrupt_acts[names[0]].shape[2] if component == "attn_head" else 0
    units, axes, shape = patch_units(component, n_layers, n_heads, n_pos, per_position)
    per_pass = interventions_per_pass or max(1, 128 // batch)
    with torch.no_grad():
        base = float(_scalar(metric(_forward(model, clean, mask))))
        effects = []
        chunks = [units[i:i + per_pass] for i in range(0, len(units), per_pass)]
        for chunk in tqdm(chunks, desc=f"activation patching ({component})", disable=not progress):
            copies = len(chunk)

            def hook_for(layer: int, chunk: list = chunk) -> Callable:
                def hook(x, hook):
                    parts = list(x.split(batch))
                    for i, (unit_layer, index) in enumerate(chunk):
                        if unit_layer == layer:
                            parts[i] = patched(parts[i], corrupt_acts[names[layer]].to(x.dtype), component, index)
                    return torch.cat(parts)

                return hook

            layers = sorted({layer for layer, _ in chunk})
            tokens = clean.repeat(copies, 1)
            chunk_mask = None if mask is None else mask.repeat(copies, 1)
            with model.hooks(fwd_hooks=[(names[layer], hook_for(layer)) for layer in layers]):
                logits = _forward(model, tokens, chunk_mask)
            effects += [float(_scalar(metric(part))) - base for part in logits.split(batch)]
    scores = torch.tensor(effects, dtype=torch.float32).reshape(shape)
    return PatchingResult(scores, axes, component, "activation patching")
