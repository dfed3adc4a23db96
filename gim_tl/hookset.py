"""``GIMHookSet``: TransformerLens forward hooks that make every gradient a GIM gradient.

Every rule is installed by a *forward* hook that places a backward modification on the hooked
activation (a gradient hook on it; an autograd Function: TSG, the Bridge freeze of a fused norm; or a
pre-hook on an autograd node: the one where a Bridge norm computes its statistic gets no gradient, the
gated MLP's ``act(gate)·up`` gets ×½; see :mod:`gim_tl.rules`): the values are unchanged (the forward
pass is bit-identical), only the backward differs. So any gradient read afterwards — ``.backward()``,
your own backward hooks, ``run_with_cache(incl_bwd=True)``, attribution patching, EAP — is the GIM gradient.

What a backward hook (or the ``*_grad`` entries of ``run_with_cache(incl_bwd=True)``) sees at a
modified point:

============================  ===========================================================
hook point                    gradient seen there
============================  ===========================================================
``attn.hook_attn_scores``     the TSG gradient (after TSG, before the q/k factor)
``attn.hook_pattern``         ``dL/dA`` as it arrives from ``A @ V``; a tensor returned there is
                              what TSG then turns into the score gradient
``attn.hook_q/k`` (and        the gradient *after* the ¼: the factor is applied once, to the score
``hook_rot_q/k``)             gradient (as it leaves TSG), which scales both branches exactly.
                              With unequal q/k factors it is applied at hook_q/k instead, and a
                              hook there sees the gradient before it
``attn.hook_v``               the gradient *before* the ½ factor; upstream sees it scaled
``mlp.hook_pre/_pre_linear``  the gradient *after* the ½ (gated MLPs only): the factor is applied once, to
                              the gradient entering ``act(gate)·up``, which scales both branches exactly.
                              With unequal gate/up factors it is applied at these points instead, and a
                              hook there sees the gradient before it
``mlp.hook_post``             the GIM gradient at the product (before its branches' ½)
``*.hook_scale``,             HookedTransformer: none at hook_scale (detached), the GIM
``*.hook_normalized``         gradient at hook_normalized. TransformerBridge: none at either
                              (side values of the norm; GIM freezes the statistic of HF's own)
``ln*.hook_in`` (Bridge)      the norm branch's GIM (frozen-statistic) gradient. Where the set
                              replaces the norm's backward (a fused LayerNorm kernel) it runs
                              this point's backward hooks itself, as for TSG (TL aliases
                              ``hook_resid_mid`` to ``ln2.hook_in`` on bridges: that is the MLP
                              branch only; read ``hook_resid_pre/post`` for residual gradients)
every other point             the GIM gradient (resid, z, result, mlp_out, embed, ...)
============================  ===========================================================

A backward hook that *returns* a tensor at v (or gate/up, unequal factors) replaces what GIM sends upstream there
(TL's last-returned-wins rule); read-only hooks are safe everywhere. TSG bypasses the model's own
softmax node (and the Bridge norm freeze of a fused norm its backward), so the set runs the backward hooks
bound (at forward time, as PyTorch does) to ``hook_pattern``, ``hook_attn_scores`` and such a Bridge
norm's ``hook_in`` itself, in the same order and with the same semantics.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from gim_tl import rules, stacking
from gim_tl.config import GIMConfig, preset
from gim_tl.layout import GIMModelError, LayerSites, ModelLayout, NormSite, discover

Hook = tuple[str, Callable]


class GIMRuleError(RuntimeError):
    """A GIM rule that was expected did not take effect."""


@dataclass(frozen=True)
class RuleStatus:
    """One rule at one site: how often it was installed in forward and applied in backward."""

    rule: str
    site: str
    forward: int
    backward: int

    @property
    def ok(self) -> bool:
        return self.forward > 0 and self.backward > 0


class GIMReport(list):
    """A list of :class:`RuleStatus`, printable as a table; ``missing`` lists what did not fire."""

    @property
    def missing(self) -> list[RuleStatus]:
        return [r for r in self if not r.ok]

    def __str__(self) -> str:
        lines = [f"{'rule':<16} {'site':<28} {'forward':>7} {'backward':>8}"]
        lines += [f"{r.rule:<16} {r.site:<28} {r.forward:>7} {r.backward:>8}" + ("" if r.ok else "  <- did not fire")
                  for r in self]
        return "\n".join(lines)

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame([r.__dict__ for r in self])


class GIMHookSet:
    """GIM as one set of TransformerLens hooks.

    ``GIMHookSet()`` is full GIM: TSG at T = 2, every norm frozen, q/k ×¼, v ×½, gate/up ×½.
    Rules and constants are keyword arguments (see :class:`gim_tl.config.GIMConfig`);
    ``GIMHookSet.preset("freeze_norm+tsg")`` gives the paper's ablation variants.

    Use it like any TL hook list::

        gim = GIMHookSet()
        with model.hooks(fwd_hooks=gim.fwd_hooks(model), bwd_hooks=gim.bwd_hooks(model)):
            metric(model(tokens)).backward()
        with gim.attach(model):                       # the same, as a context manager
            metric(model(tokens)).backward()
        gim.add_to(model); ...; gim.remove_from(model)  # persistent, survives reset_hooks()
        gim.run_with_hooks(model, tokens)              # model.run_with_hooks with GIM added

    After a backward pass, :meth:`report` says which rules fired where and :meth:`verify`
    raises :class:`GIMRuleError` if an expected rule did not.
    """

    def __init__(self, config: GIMConfig | None = None, **overrides) -> None:
        self.config = (config or GIMConfig()).replace(**overrides) if overrides else (config or GIMConfig())
        self._forward: Counter = Counter()
        self._backward: Counter = Counter()
        self._expected: list[tuple[str, str]] = []
        self._persistent: dict[int, list] = {}

    @classmethod
    def preset(cls, name: str, **overrides) -> GIMHookSet:
        """A hook set for a named ablation preset (``"plain"``, ``"tsg"``, ..., ``"gim"``)."""
        hook_set = cls(preset(name), **overrides)
        hook_set.name = name  # results label themselves by it (gim_tl.stacking.method_of)
        return hook_set

    def __repr__(self) -> str:
        return f"GIMHookSet({self.config})"

    # ---- hook lists --------------------------------------------------------------------

    def fwd_hooks(self, model) -> list[Hook]:
        """TL-native ``(hook_name, fn)`` forward hooks that install every enabled rule."""
        stacking.check_install(model, self)  # a model GIM can use, with no GIM set on it yet
        layout = discover(model, norms=self.config.freeze_norm)
        self._check_model(model, layout)
        self._expected = []
        self.reset_counts()
        hooks: list[Hook] = []
        cfg = self.config
        for sites in layout.layers:
            if cfg.tsg:
                hooks += self._tsg_hooks(layout, sites)
            if cfg.grad_norm:
                hooks += self._grad_norm_hooks(sites)
        if cfg.freeze_norm:
            if not layout.norms:
                raise GIMModelError(f"{type(model).__name__} has no *.hook_scale points: the norm freeze cannot be "
                                    "applied. Pass freeze_norm=False if the model really has no LayerNorm/RMSNorm.")
            for norm in layout.norms:
                hooks += self._freeze_hooks(layout, norm)
        return stacking.mark(self, hooks)

    def bwd_hooks(self, model) -> list[Hook]:
        """Always ``[]``: every rule is placed in the autograd graph by a forward hook.

        Kept so the hook set drops into code that passes both lists to ``model.hooks``.
        """
        discover(model, norms=self.config.freeze_norm)
        return []

    # ---- ways to attach ----------------------------------------------------------------

    @contextlib.contextmanager
    def attach(self, model) -> Iterator[GIMHookSet]:
        """Context manager: GIM hooks on ``model`` inside the block (run forward *and* backward inside)."""
        with model.hooks(fwd_hooks=self.fwd_hooks(model)):
            yield self

    def add_to(self, model) -> GIMHookSet:
        """Attach persistently (TL permanent hooks: they survive ``reset_hooks()`` and
        ``run_with_hooks``). Undo with :meth:`remove_from`."""
        handles = []
        hook_points = dict(model.hook_dict)
        for name, fn in self.fwd_hooks(model):
            point = hook_points[name]
            model.add_hook(name, fn, dir="fwd", is_permanent=True)
            handles.append((point, point.fwd_hooks[-1]))
        self._persistent[id(model)] = handles
        return self

    def remove_from(self, model) -> None:
        """Remove the hooks that :meth:`add_to` attached (and nothing else)."""
        for point, handle in self._persistent.pop(id(model), []):
            handle.hook.remove()
            if handle in point.fwd_hooks:
                point.fwd_hooks.remove(handle)

    def run_with_hooks(self, model, *model_args, fwd_hooks=(), bwd_hooks=(), **model_kwargs):
        """``model.run_with_hooks`` with GIM's hooks added to yours (backward afterwards still uses GIM)."""
        return model.run_with_hooks(*model_args, fwd_hooks=self.fwd_hooks(model) + list(fwd_hooks),
                                    bwd_hooks=list(bwd_hooks), **model_kwargs)

    # ---- self-checks -------------------------------------------------------------------

    def report(self) -> GIMReport:
        """Per rule and site: forward installs and backward applications since the last reset."""
        return GIMReport(RuleStatus(rule, site, self._forward[(rule, site)], self._backward[(rule, site)])
                         for rule, site in self._expected)

    def verify(self) -> GIMReport:
        """Raise :class:`GIMRuleError` if an expected rule was not applied in the last backward pass(es)."""
        report = self.report()
        if not self._expected:
            raise GIMRuleError("no GIM rule was set up: build the hooks with fwd_hooks(model) or attach(model) first")
        if report.missing:
            raise GIMRuleError(
                "these GIM rules did not fire (no forward through the hook, or no gradient reached it):\n"
                + str(GIMReport(report.missing))
                + "\nRun forward and backward with the hooks attached, and make sure the metric depends on every layer."
            )
        return report

    def reset_counts(self) -> None:
        self._forward.clear()
        self._backward.clear()

    # ---- internals ---------------------------------------------------------------------

    def _check_model(self, model, layout: ModelLayout) -> None:
        if layout.kind != "bridge":
            return
        if model.training:
            raise GIMModelError("the TransformerBridge is in training mode: attention dropout would make hook_pattern "
                                "differ from softmax(hook_attn_scores). Call model.eval() first.")
        for flag, setter in (("use_split_qkv_input", "set_use_split_qkv_input"), ("use_attn_in", "set_use_attn_in")):
            if getattr(model.cfg, flag, False) and self.config.freeze_norm:
                raise GIMModelError(
                    f"TransformerBridge with cfg.{flag}=True recomputes ln1 per head through HF's norm, bypassing "
                    f"ln1's hook points, so the norm freeze cannot be applied. Call model.{setter}(False), or use a "
                    "HookedTransformer (TL 3.9), whose split inputs keep the hook points.")

    def _counted(self, rule: str, site: str) -> Callable[[], None]:
        """Register an expected (rule, site) and return the callback its backward calls."""
        key = (rule, site)
        if key not in self._expected:
            self._expected.append(key)

        def fired() -> None:
            self._backward[key] += 1

        return fired

    def _tsg_hooks(self, layout: ModelLayout, sites: LayerSites) -> list[Hook]:
        cfg = self.config
        site = sites.attn
        fired = self._counted("tsg", site)
        # q/k gradient normalization rides on TSG's output (GIMConfig.qk_on_scores).
        qk_factor = cfg.q_scale if cfg.qk_on_scores else 1.0
        qk_fired = self._counted("grad_norm.qk", f"{site}.hook_attn_scores") if qk_factor != 1.0 else None
        scores_point = layout.hook_points[f"{site}.hook_attn_scores"]
        pattern_point = layout.hook_points[f"{site}.hook_pattern"]
        pending: dict = {}

        def save_scores(scores, hook):
            if not scores.is_floating_point():
                raise GIMModelError(f"{site}.hook_attn_scores has dtype {scores.dtype}; GIM needs floating point")
            pending["scores"] = scores
            pending["scores_hooks"] = bound_backward_hooks(scores_point)
            return None

        def tsg_pattern(pattern, hook):
            scores = pending.pop("scores", None)
            scores_hooks = pending.pop("scores_hooks", [])
            if scores is None:
                raise GIMModelError(
                    f"{site}.hook_attn_scores did not fire before {site}.hook_pattern, so TSG has no scores. "
                    "This happens with TransformerBridge.boot_native models, whose hook_attn_scores is a copy of the "
                    "pattern outside the autograd graph: load the model with TransformerBridge.boot_transformers "
                    "(hf_model=...) or use a HookedTransformer.")
            if not pattern.requires_grad:
                return None
            if not scores.requires_grad or scores.shape != pattern.shape:
                raise GIMModelError(
                    f"{site}.hook_attn_scores is not the autograd input of the softmax behind {site}.hook_pattern "
                    f"(requires_grad={scores.requires_grad}, shapes {tuple(scores.shape)} vs {tuple(pattern.shape)}); "
                    "TSG cannot be placed. Use a boot_transformers bridge or a HookedTransformer.")
            keep_scores = cfg.tsg_source == "scores" or (cfg.tsg_source == "auto" and pattern.dtype == torch.float16)
            pattern_hooks = bound_backward_hooks(pattern_point)

            def map_grad_pattern(grad):
                return run_backward_hooks(pattern_point, pattern_hooks, grad)

            def map_grad_scores(grad):
                fired()
                if qk_fired is None:
                    return run_backward_hooks(scores_point, scores_hooks, grad)
                qk_fired()
                if scores_hooks:  # they may keep the tensor they saw: scale a copy
                    return run_backward_hooks(scores_point, scores_hooks, grad) * qk_factor
                return grad.mul_(qk_factor)  # TSG's own fresh buffer, seen by nobody

            self._forward[("tsg", site)] += 1
            if qk_fired is not None:
                self._forward[("grad_norm.qk", f"{site}.hook_attn_scores")] += 1
            return rules.apply_tsg(scores, pattern, cfg.temperature, keep_scores=keep_scores,
                                   use_triton=cfg.use_triton,
                                   map_grad_pattern=map_grad_pattern if pattern_hooks else None,
                                   map_grad_scores=map_grad_scores)

        return [(f"{site}.hook_attn_scores", save_scores), (f"{site}.hook_pattern", tsg_pattern)]

    def _scale_hook(self, rule: str, name: str, factor: float) -> Hook:
        fired = self._counted(rule, name)

        def scale(x, hook):
            if not x.requires_grad:
                return None
            self._forward[(rule, name)] += 1
            return rules.scale_grad(x, factor, fired)

        return (name, scale)

    def _grad_norm_hooks(self, sites: LayerSites) -> list[Hook]:
        cfg = self.config
        hooks = []
        if not cfg.qk_on_scores:
            hooks += [self._scale_hook(f"grad_norm.{p}", f"{sites.attn}.hook_{p}", getattr(cfg, f"{p}_scale"))
                      for p in ("q", "k")]
        elif not cfg.tsg and cfg.q_scale != 1.0:  # with TSG on, TSG's backward applies it
            hooks.append(self._scale_hook("grad_norm.qk", f"{sites.attn}.hook_attn_scores", cfg.q_scale))
        hooks.append(self._scale_hook("grad_norm.v", f"{sites.attn}.hook_v", cfg.v_scale))
        if sites.gated_mlp and cfg.gate_up_on_product and sites.product:
            hooks.append(self._gate_up_hook(sites))
        elif sites.gated_mlp:
            hooks.append(self._scale_hook("grad_norm.gate", f"{sites.mlp}.hook_pre", cfg.gate_scale))
            hooks.append(self._scale_hook("grad_norm.up", f"{sites.mlp}.hook_pre_linear", cfg.up_scale))
        return hooks

    def _gate_up_hook(self, sites: LayerSites) -> Hook:
        """Gate and up ×s at once, on the node of ``act(gate) · up`` behind ``mlp.hook_post``
        (``GIMConfig.gate_up_on_product``); a hook at hook_post sees the gradient before it."""
        name = f"{sites.mlp}.hook_post"
        fired = self._counted("grad_norm.gate_up", name)
        factor = self.config.gate_scale

        def scale_product(post, hook):
            if not post.requires_grad:
                return None
            node = rules.product_node(post, sites.product)
            if node is None:
                found = None if post.grad_fn is None else post.grad_fn.name()
                raise GIMModelError(
                    f"{name} is not act(gate) · up here (its autograd node is {found}, expected {sites.product[0]}), "
                    "so GIM cannot scale the gate and up gradients there. A forward hook that ran before GIM's may "
                    "have replaced it: attach GIM's hooks before hooks that edit mlp.hook_post.")
            self._forward[("grad_norm.gate_up", name)] += 1
            rules.scale_node_grad(node, factor, fired)
            return None

        return (name, scale_product)

    def _freeze_hooks(self, layout: ModelLayout, norm: NormSite) -> list[Hook]:
        site = norm.prefix
        fired = self._counted("freeze_norm", site)
        if norm.strategy == "detach":
            def detach_scale(scale, hook):
                if not scale.requires_grad:
                    return None
                self._forward[("freeze_norm", site)] += 1
                return rules.freeze_scale(scale)

            def count_backward(normalized, hook):  # the frozen norm's backward runs through here
                if normalized.requires_grad:
                    rules.capture_grad(normalized, lambda g: fired())

            return [(f"{site}.hook_scale", detach_scale), (f"{site}.hook_normalized", count_backward)]

        # Bridge: the norm runs HF's module. "cut": its statistic's node gets no gradient. "replace" (a fused
        # kernel, or a graph unlike the probe's): a Function at its output replaces its whole backward.
        in_point = layout.hook_points[f"{site}.hook_in"]
        pending: dict = {}

        def at_input(x, hook):
            pending["x"] = x
            pending["hooks"] = bound_backward_hooks(in_point)

        def at_output(y, hook):
            x, in_hooks = pending.pop("x", None), pending.pop("hooks", [])
            if x is None or not y.requires_grad:
                return None
            self._forward[("freeze_norm", site)] += 1
            if norm.strategy == "cut":
                node = rules.graph_node(y.grad_fn, norm.cut_path, norm.cut_names)
                if node is not None:
                    rules.drop_gradient(node, fired)
                    return None

            def map_grad_input(grad):  # the norm's own backward is bypassed: run hook_in's hooks here
                fired()
                return run_backward_hooks(in_point, in_hooks, grad) if in_hooks else grad

            return rules.apply_norm_freeze(y, x, norm.weight, norm.bias, weight_offset=norm.weight_offset,
                                           eps=norm.eps, centered=norm.centered, map_grad_input=map_grad_input)

        return [(f"{site}.hook_in", at_input), (f"{site}.hook_out", at_output)]


def bound_backward_hooks(point) -> list[Callable]:
    """The backward hooks on a HookPoint right now: PyTorch binds this list at forward time."""
    return list(point._backward_hooks.values())


def run_backward_hooks(point, hook_fns: list[Callable], grad: torch.Tensor) -> torch.Tensor:
    """Run a HookPoint's backward hooks on ``grad`` as PyTorch would (TSG's bypass skips the point).

    Each hook sees the incoming gradient; the last one that returns a tensor sets what flows on.
    """
    result = (grad,)
    for fn in hook_fns:
        out = fn(point, result, (grad,))
        if out is not None:
            result = out
    return result[0]
