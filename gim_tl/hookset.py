"""``GIMHookSet``: TransformerLens forward hooks that make every gradient a GIM gradient.

Every rule (defined in :mod:`gim_tl.rules`) is installed by a *forward* hook that places a backward
modification on the hooked activation (a gradient hook on it; an autograd Function: TSG, the Bridge freeze
of a fused norm; or a pre-hook on an autograd node: the one where a Bridge norm computes its statistic gets
no gradient, the gated MLP's ``act(gate)·up`` gets ×½; see :mod:`gim_tl.placement` and :mod:`gim_tl.fast`):
the values are unchanged (the forward pass is bit-identical), only the backward differs. So any gradient
read afterwards — ``.backward()``, your own backward hooks, ``run_with_cache(incl_bwd=True)``, attribution
patching, EAP — is the GIM gradient.

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
norm's ``hook_in`` itself, in the same order and with the same semantics (:mod:`gim_tl.hook_shim`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from gim_tl import placement, stacking
from gim_tl._internals import add_permanent_forward_hook, remove_forward_hook
from gim_tl.config import GIMConfig, preset
from gim_tl.layout import GIMModelError, ModelLayout, discover
from gim_tl.placement import Hook
from gim_tl.report import GIMReport, GIMRuleError, RuleCounter, RuleStatus

__all__ = ["GIMHookSet", "GIMReport", "GIMRuleError", "RuleStatus", "Hook"]


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
    raises :class:`GIMRuleError` if an expected rule did not. Counts are kept per model and per
    forward pass (:class:`gim_tl.report.RuleCounter`), so one set may serve several models.
    """

    def __init__(self, config: GIMConfig | None = None, **overrides) -> None:
        self.config = (config or GIMConfig()).replace(**overrides) if overrides else (config or GIMConfig())
        self.counter = RuleCounter()
        self.name: str | None = None  # the preset it was made from (GIMHookSet.preset); results are labelled by it
        self._persistent: dict[int, list] = {}

    @classmethod
    def preset(cls, name: str, **overrides) -> GIMHookSet:
        """A hook set for a named ablation preset (``"plain"``, ``"tsg"``, ..., ``"gim"``)."""
        hook_set = cls(preset(name), **overrides)
        hook_set.name = name
        return hook_set

    def __repr__(self) -> str:
        return f"GIMHookSet({self.config})"

    # ---- hook lists --------------------------------------------------------------------

    def fwd_hooks(self, model) -> list[Hook]:
        """TL-native ``(hook_name, fn)`` forward hooks that install every enabled rule.

        Every way to attach the set builds its hooks here, once per call.
        """
        stacking.check_install(model, self)  # a model GIM can use, with no GIM set on it yet
        cfg = self.config
        layout = discover(model, norms=cfg.freeze_norm)
        self._check_model(model, layout)
        build = self.counter.build(model)
        hooks: list[Hook] = []
        for sites in layout.layers:
            if cfg.tsg:
                hooks += placement.tsg_hooks(cfg, layout, sites, build)
            if cfg.grad_norm:
                hooks += placement.grad_norm_hooks(cfg, sites, build)
        if cfg.freeze_norm:
            if not layout.norms:
                raise GIMModelError(f"{type(model).__name__} has no *.hook_scale points: the norm freeze cannot be "
                                    "applied. Pass freeze_norm=False if the model really has no LayerNorm/RMSNorm.")
            for norm in layout.norms:
                hooks += placement.freeze_norm_hooks(layout, norm, build)
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
        hook_points = dict(model.hook_dict)
        handles = []
        for name, fn in self.fwd_hooks(model):
            point = hook_points[name]
            handles.append((point, add_permanent_forward_hook(model, name, fn, point)))
        self._persistent[id(model)] = handles
        return self

    def remove_from(self, model) -> None:
        """Remove the hooks that :meth:`add_to` attached (and nothing else)."""
        for point, handle in self._persistent.pop(id(model), []):
            remove_forward_hook(point, handle)

    def run_with_hooks(self, model, *model_args, fwd_hooks=(), bwd_hooks=(), **model_kwargs):
        """``model.run_with_hooks`` with GIM's hooks added to yours (backward afterwards still uses GIM)."""
        return model.run_with_hooks(*model_args, fwd_hooks=self.fwd_hooks(model) + list(fwd_hooks),
                                    bwd_hooks=list(bwd_hooks), **model_kwargs)

    # ---- self-checks -------------------------------------------------------------------

    def report(self) -> GIMReport:
        """Per model, forward pass, rule and site: forward installs and backward applications since the last
        reset (see :class:`gim_tl.report.RuleStatus`)."""
        return self.counter.report()

    def verify(self) -> GIMReport:
        """Raise :class:`GIMRuleError` if a rule expected in a backpropagated forward pass was not applied,
        or if no forward pass has had a backward yet; otherwise return the report."""
        return self.counter.verify()

    def reset_counts(self) -> None:
        """Forget every count (the hooks stay valid and count again from their next forward)."""
        self.counter.reset()

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
