"""Where each GIM rule goes in a TransformerLens model: one function per rule, returning TL forward hooks.

Each hook places the rule's backward on the activation it sees (a gradient hook, a node pre-hook or an
autograd Function from :mod:`gim_tl.fast`) and returns the same values, so the forward pass is bit-identical.
Every install and application is counted in the :class:`~gim_tl.report.HookBuild` passed in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gim_tl import fast
from gim_tl._internals import graph_node, product_node
from gim_tl.config import GIMConfig
from gim_tl.hook_shim import bound_backward_hooks, run_backward_hooks
from gim_tl.layout import GIMModelError, LayerSites, ModelLayout, NormSite
from gim_tl.report import HookBuild

Hook = tuple[str, Callable]


def tsg_hooks(cfg: GIMConfig, layout: ModelLayout, sites: LayerSites, build: HookBuild) -> list[Hook]:
    """TSG at one attention layer: ``hook_attn_scores`` keeps the scores, ``hook_pattern`` returns the pattern
    through :func:`gim_tl.fast.apply_tsg`, whose backward sends TSG's gradient to the scores. With equal q and
    k factors (``cfg.qk_on_scores``) that backward also applies them, once, to the score gradient."""
    site = sites.attn
    build.expect("tsg", site)
    qk_factor = cfg.q_scale if cfg.qk_on_scores else 1.0
    qk_site = f"{site}.hook_attn_scores"
    if qk_factor != 1.0:
        build.expect("grad_norm.qk", qk_site)
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
        applied = build.install("tsg", site)
        qk_applied = build.install("grad_norm.qk", qk_site) if qk_factor != 1.0 else None

        def map_grad_pattern(grad):
            return run_backward_hooks(pattern_point, pattern_hooks, grad)

        def map_grad_scores(grad):
            applied()
            if qk_applied is None:
                return run_backward_hooks(scores_point, scores_hooks, grad)
            qk_applied()
            if scores_hooks:  # they may keep the tensor they saw: scale a copy
                return run_backward_hooks(scores_point, scores_hooks, grad) * qk_factor
            return grad.mul_(qk_factor)  # TSG's own fresh buffer, seen by nobody

        return fast.apply_tsg(scores, pattern, cfg.temperature, keep_scores=keep_scores, use_triton=cfg.use_triton,
                              map_grad_pattern=map_grad_pattern if pattern_hooks else None,
                              map_grad_scores=map_grad_scores)

    return [(f"{site}.hook_attn_scores", save_scores), (f"{site}.hook_pattern", tsg_pattern)]


def scale_hook(rule: str, name: str, factor: float, build: HookBuild) -> Hook:
    """Gradient normalization at hook point ``name``: its value's gradient ×``factor``
    (:func:`gim_tl.fast.scale_grad_by_hook`); a backward hook there sees the gradient before it."""
    build.expect(rule, name)

    def scale(x, hook):
        if not x.requires_grad:
            return None
        return fast.scale_grad_by_hook(x, factor, build.install(rule, name))

    return (name, scale)


def gate_up_hook(cfg: GIMConfig, sites: LayerSites, build: HookBuild) -> Hook:
    """Gate and up ×s at once, on the autograd node of ``act(gate) · up`` behind ``mlp.hook_post``
    (``cfg.gate_up_on_product``; :func:`gim_tl.fast.scale_node_grad`); a hook at hook_post sees the gradient
    before it."""
    name = f"{sites.mlp}.hook_post"
    build.expect("grad_norm.gate_up", name)
    factor = cfg.gate_scale

    def scale_product(post, hook):
        if not post.requires_grad:
            return None
        node = product_node(post, sites.product)
        if node is None:
            found = None if post.grad_fn is None else post.grad_fn.name()
            raise GIMModelError(
                f"{name} is not act(gate) · up here (its autograd node is {found}, expected {sites.product[0]}), "
                "so GIM cannot scale the gate and up gradients there. A forward hook that ran before GIM's may "
                "have replaced it: attach GIM's hooks before hooks that edit mlp.hook_post.")
        fast.scale_node_grad(node, factor, build.install("grad_norm.gate_up", name))
        return None

    return (name, scale_product)


def grad_norm_hooks(cfg: GIMConfig, sites: LayerSites, build: HookBuild) -> list[Hook]:
    """Gradient normalization in one layer: q and k (on the score gradient when their factors are equal,
    by TSG's backward if TSG is on), v, and a gated MLP's gate and up (on their product when equal)."""
    hooks = []
    if not cfg.qk_on_scores:
        hooks += [scale_hook(f"grad_norm.{p}", f"{sites.attn}.hook_{p}", getattr(cfg, f"{p}_scale"), build)
                  for p in ("q", "k")]
    elif not cfg.tsg and cfg.q_scale != 1.0:  # with TSG on, TSG's backward applies it
        hooks.append(scale_hook("grad_norm.qk", f"{sites.attn}.hook_attn_scores", cfg.q_scale, build))
    hooks.append(scale_hook("grad_norm.v", f"{sites.attn}.hook_v", cfg.v_scale, build))
    if sites.gated_mlp and cfg.gate_up_on_product and sites.product:
        hooks.append(gate_up_hook(cfg, sites, build))
    elif sites.gated_mlp:
        hooks.append(scale_hook("grad_norm.gate", f"{sites.mlp}.hook_pre", cfg.gate_scale, build))
        hooks.append(scale_hook("grad_norm.up", f"{sites.mlp}.hook_pre_linear", cfg.up_scale, build))
    return hooks


def freeze_norm_hooks(layout: ModelLayout, norm: NormSite, build: HookBuild) -> list[Hook]:
    """The norm freeze at one norm, by ``norm.strategy``:

    * ``"detach"`` (HookedTransformer): ``hook_scale`` (σ) is detached in forward, literally
      :func:`gim_tl.rules.frozen_norm`; the application is counted where the gradient passes ``hook_normalized``.
    * ``"cut"`` (a bridge over an HF norm written in PyTorch ops): the autograd node that computes σ gets no
      gradient (:func:`gim_tl.fast.drop_gradient`).
    * ``"replace"`` (a fused norm kernel, or a graph unlike the probe's): :func:`gim_tl.fast.apply_norm_freeze`
      at ``hook_out`` replaces the norm's backward, and runs ``hook_in``'s backward hooks, which it bypasses.
    """
    site = norm.prefix
    build.expect("freeze_norm", site)
    if norm.strategy == "detach":
        pending: dict = {}

        def detach_scale(scale, hook):
            if not scale.requires_grad:
                return None
            pending["applied"] = build.install("freeze_norm", site)
            return scale.detach()

        def count_backward(normalized, hook):  # the frozen norm's backward runs through here
            applied = pending.pop("applied", None)
            if applied is not None and normalized.requires_grad:
                normalized.register_hook(lambda grad: applied())

        return [(f"{site}.hook_scale", detach_scale), (f"{site}.hook_normalized", count_backward)]

    in_point = layout.hook_points[f"{site}.hook_in"]
    seen: dict = {}

    def at_input(x, hook):
        seen["x"] = x
        seen["hooks"] = bound_backward_hooks(in_point)

    def at_output(y, hook):
        x, in_hooks = seen.pop("x", None), seen.pop("hooks", [])
        if x is None or not y.requires_grad:
            return None
        applied = build.install("freeze_norm", site)
        if norm.strategy == "cut":
            node = graph_node(y.grad_fn, norm.cut_path, norm.cut_names)
            if node is not None:
                fast.drop_gradient(node, applied)
                return None

        def map_grad_input(grad):  # the norm's own backward is bypassed: run hook_in's hooks here
            applied()
            return run_backward_hooks(in_point, in_hooks, grad) if in_hooks else grad

        return fast.apply_norm_freeze(y, x, norm.weight, norm.bias, weight_offset=norm.weight_offset,
                                      eps=norm.eps, centered=norm.centered, map_grad_input=map_grad_input)

    return [(f"{site}.hook_in", at_input), (f"{site}.hook_out", at_output)]
