"""Where GIM's rules sit in a TransformerLens model: the hook points of each layer and norm.

Works for TL 3.9 ``HookedTransformer`` and for ``TransformerBridge`` (TL 3.9 and 4.x) over HF
models. Anything GIM cannot use raises :class:`GIMModelError` naming what is missing and what to do.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Literal

import torch

from gim_tl._internals import ADD_NODE, MUL_NODE, graph_nodes
from gim_tl.fast import drop_gradient, norm_stats
from gim_tl.rules import frozen_norm_input_grad


class GIMModelError(ValueError):
    """The model's hook points cannot carry a GIM rule."""


Kind = Literal["hooked", "bridge"]


@dataclass(frozen=True)
class NormSite:
    """One LayerNorm/RMSNorm, by its hook-point prefix (``blocks.0.ln1``, ``ln_final``, ...).

    ``strategy`` says how the statistic is frozen:
    * ``"detach"``: ``hook_scale`` is in the graph (HookedTransformer): detach it in forward.
    * ``"cut"``: TransformerBridge over an HF norm written in PyTorch ops (Llama's, Gemma's RMSNorm):
      the node that computes its statistic, ``cut_path`` (``next_functions`` indices from the output's
      node, through nodes named ``cut_names``), gets no gradient (``fast.drop_gradient``).
    * ``"replace"``: TransformerBridge over a fused norm kernel (``nn.LayerNorm``), whose statistic is no
      node of the graph: ``fast.apply_norm_freeze`` at ``hook_out`` replaces the norm's backward; it
      needs ``centered``, ``eps``, the parameters and ``weight_offset`` (Gemma's ``1 + w``: 1). A
      ``"cut"`` site whose graph turns out unlike the probe's falls back to it.
    """

    prefix: str
    strategy: Literal["detach", "cut", "replace"]
    centered: bool = False
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    weight_offset: float = 0.0
    eps: float = 1e-5
    cut_path: tuple[int, ...] = ()
    cut_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class LayerSites:
    """The hook points of one transformer block."""

    layer: int
    gated_mlp: bool
    #: Gated MLPs whose ``mlp.hook_post`` is ``act(gate) · up`` (+ ``b_in``): the autograd nodes from it to
    #: the product along first inputs (see ``_internals.product_node``); ``()`` where there is no such point.
    product: tuple[str, ...] = ()

    @property
    def attn(self) -> str:
        return f"blocks.{self.layer}.attn"

    @property
    def mlp(self) -> str:
        return f"blocks.{self.layer}.mlp"


@dataclass(frozen=True)
class ModelLayout:
    kind: Kind
    layers: tuple[LayerSites, ...]
    norms: tuple[NormSite, ...]
    hook_points: dict  # name -> HookPoint, read once (a Bridge rebuilds ``hook_dict`` on every access)


def model_kind(model) -> Kind:
    """``"bridge"`` for a TransformerBridge, ``"hooked"`` for a HookedTransformer."""
    names = {cls.__name__ for cls in type(model).__mro__}
    if "TransformerBridge" in names:
        return "bridge"
    if "HookedTransformer" in names:
        return "hooked"
    raise GIMModelError(
        f"GIM needs a TransformerLens HookedTransformer or TransformerBridge, got {type(model).__name__}. "
        "Wrap an HF model with TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tok)."
    )


def _require(model, hook_points: dict, names: list[str], why: str) -> None:
    missing = [n for n in names if n not in hook_points]
    if missing:
        raise GIMModelError(
            f"{type(model).__name__} lacks hook points GIM needs for {why}: {missing}. "
            "GIM supports TL HookedTransformer and TransformerBridge decoder models with standard "
            "attention (hook_attn_scores, hook_pattern, hook_q/k/v) and MLPs (mlp.hook_pre)."
        )


def _placement(hf_norm: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and dtype a probe of ``hf_norm`` runs in: its weight's (fp32 on CPU without parameters)."""
    weight = getattr(hf_norm, "weight", None)
    ref = weight if weight is not None else next(hf_norm.parameters(), None)
    return (ref.device, ref.dtype) if ref is not None else (torch.device("cpu"), torch.float32)


#: The convention found for each HF norm module (it cannot change without a new module).
_CONVENTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _norm_convention(prefix: str, hf_norm: torch.nn.Module, centered: bool, d_model: int) -> tuple[float, float]:
    """``(offset, eps)`` such that ``hf_norm`` computes ``(w + offset) ⊙ (x − μ)/σ + b``, σ² = var + eps.

    Found once per module by running it on a probe, so the freeze does not rely on a flag: a norm
    that fits neither weight convention (0 or Gemma's 1), or whose ε is not the one it declares
    (the probe's second row has a variance of ε/4, where ε dominates σ), is refused.
    """
    if hf_norm in _CONVENTIONS:
        return _CONVENTIONS[hf_norm]
    weight = getattr(hf_norm, "weight", None)
    bias = getattr(hf_norm, "bias", None)
    eps = getattr(hf_norm, "variance_epsilon", None) or getattr(hf_norm, "eps", None) or 1e-5
    eps = float(eps)
    device, dtype = _placement(hf_norm)
    probe = torch.randn(2, d_model, generator=torch.Generator().manual_seed(0))
    probe[1] = probe[1] / probe[1].pow(2).mean().sqrt() * (eps / 4) ** 0.5  # σ² ≈ 1.25 ε (RMS case)
    probe = probe.to(device, dtype)
    with torch.no_grad():
        got = hf_norm(probe).float()
        mean, inv_sigma = norm_stats(probe, eps, centered=centered)  # the statistic FrozenNorm will use
        normed = (probe.float() if mean is None else probe.float() - mean) * inv_sigma
        if bias is not None:
            got = got - bias.float()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        for offset in (0.0, 1.0) if weight is not None else (0.0,):
            want = normed if weight is None else normed * (weight.float() + offset)
            if torch.allclose(got, want, rtol=tol, atol=tol):
                _CONVENTIONS[hf_norm] = (offset, eps)
                return offset, eps
    raise GIMModelError(
        f"{prefix}: the HF norm {type(hf_norm).__name__} computes neither w ⊙ (x − μ)/σ + b nor "
        f"(1 + w) ⊙ (x − μ)/σ + b with σ² = var + {eps:g} (its declared eps), so GIM cannot freeze its "
        "statistic. Pass freeze_norm=False, or use a HookedTransformer (TL 3.9) conversion of the model.")


#: Per HF norm module and (dtype, device): where its graph computes the statistic (None: nowhere).
_STATISTIC_NODES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _statistic_node(
    hf_norm: torch.nn.Module, centered: bool, offset: float, eps: float, d_model: int
) -> tuple[tuple[int, ...], tuple[str, ...]] | None:
    """Where ``hf_norm``'s autograd graph computes its statistic, as ``(path, names)`` for
    :func:`gim_tl._internals.graph_node` from the output's node; None for a fused kernel (no such node).

    Found on a probe by dropping the gradient of each node of the norm's graph in turn, nearest the
    output first: the statistic's node is the first whose cut leaves exactly the frozen-statistic input
    gradient (:func:`gim_tl.rules.frozen_norm_input_grad`, the norm-freeze rule). The probe's output
    gradient is aligned with ``x``, where the statistic's share of the plain gradient is as large as the
    rest, so a cut elsewhere cannot pass for it.
    """
    weight = getattr(hf_norm, "weight", None)
    device, dtype = _placement(hf_norm)
    found = _STATISTIC_NODES.setdefault(hf_norm, {})
    if (dtype, device) in found:
        return found[(dtype, device)]
    x = torch.randn(2, d_model, generator=torch.Generator().manual_seed(1)).to(device, dtype).requires_grad_(True)
    with torch.enable_grad():
        y = hf_norm(x)
    if y.grad_fn is None:  # no graph here (inference mode): "replace" works without one, and is not cached
        return None
    w = None if weight is None else weight.detach().float() + offset
    xc = x.detach().float()
    xc = xc - xc.mean(-1, keepdim=True) if centered else xc
    grad_y = (xc if w is None else xc * w).to(y.dtype)
    want = frozen_norm_input_grad(grad_y, x.detach(), w, eps, centered=centered).float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    scale = want.abs().max()

    def matches(grad: torch.Tensor | None) -> bool:
        return grad is not None and bool(((grad.float() - want).abs() <= tol * scale).all())

    result = None
    if not matches(torch.autograd.grad(y, x, grad_y, retain_graph=True)[0]):
        for path, names, node in graph_nodes(y.grad_fn):
            handle = drop_gradient(node)
            try:
                grad = torch.autograd.grad(y, x, grad_y, retain_graph=True, allow_unused=True)[0]
            finally:
                handle.remove()
            if matches(grad):
                result = (path, names)
                break
    found[(dtype, device)] = result
    return result


def _bridge_norm(model, hook_points: dict, prefix: str) -> NormSite:
    _require(model, hook_points, [f"{prefix}.hook_in", f"{prefix}.hook_out"], f"the norm freeze at {prefix}")
    module = model.get_submodule(prefix)
    centered = not bool(getattr(module, "uses_rms_norm", False))
    hf_norm = getattr(module, "original_component", None)
    if hf_norm is None or isinstance(hf_norm, torch.nn.Identity):
        raise GIMModelError(f"{prefix} has no HF norm module behind it; GIM cannot freeze its statistic. "
                            "Pass freeze_norm=False.")
    offset, eps = _norm_convention(prefix, hf_norm, centered, int(model.cfg.d_model))
    cut = _statistic_node(hf_norm, centered, offset, eps, int(model.cfg.d_model))
    return NormSite(prefix, "replace" if cut is None else "cut", centered=centered,
                    weight=getattr(hf_norm, "weight", None), bias=getattr(hf_norm, "bias", None),
                    weight_offset=offset, eps=eps, cut_path=cut[0] if cut else (), cut_names=cut[1] if cut else ())


def discover(model, *, norms: bool = True) -> ModelLayout:
    """Find every site GIM modifies, or raise :class:`GIMModelError` saying why it cannot.

    ``norms=False`` skips the norms (no norm freeze): their layout is then neither read nor checked.
    """
    kind = model_kind(model)
    cfg = model.cfg
    n_layers = int(cfg.n_layers)
    if getattr(cfg, "num_experts", None):
        raise GIMModelError("mixture-of-experts MLPs are not supported: GIM's gate/up rule needs mlp.hook_pre.")
    if getattr(cfg, "use_attention_sinks", False):
        raise GIMModelError("attention sinks change the softmax: TSG cannot be recomputed from hook_pattern.")

    hook_points = dict(model.hook_dict)
    layers = []
    for layer in range(n_layers):
        prefix = f"blocks.{layer}"
        names = [f"{prefix}.attn.hook_{p}" for p in ("attn_scores", "pattern", "q", "k", "v")]
        _require(model, hook_points, names + [f"{prefix}.mlp.hook_pre"], f"layer {layer}")
        if kind == "bridge":
            attn = model.get_submodule(f"{prefix}.attn")
            hf_attn = getattr(attn, "original_component", None)
            if getattr(hf_attn, "sinks", None) is not None:
                raise GIMModelError(f"{prefix}.attn has attention sinks: TSG cannot be recomputed from hook_pattern.")
            gated = f"{prefix}.mlp.hook_pre_linear" in hook_points
            product = (MUL_NODE,)  # HF: down_proj(act(gate_proj(x)) * up_proj(x)), hook_post = down's input
        else:
            gated = bool(cfg.gated_mlp)
            if gated:
                _require(model, hook_points, [f"{prefix}.mlp.hook_pre_linear"], f"the gated MLP of layer {layer}")
            # TL's GatedMLP: hook_post(act(pre) * pre_linear + b_in); its LN activations have no product
            product = () if cfg.is_layer_norm_activation() else (ADD_NODE, MUL_NODE)
        has_post = f"{prefix}.mlp.hook_post" in hook_points
        layers.append(LayerSites(layer, gated, product if gated and has_post else ()))

    sites = []
    if norms:
        for prefix in [n[: -len(".hook_scale")] for n in hook_points if n.endswith(".hook_scale")]:
            sites.append(NormSite(prefix, "detach") if kind == "hooked" else _bridge_norm(model, hook_points, prefix))
    return ModelLayout(kind, tuple(layers), tuple(sites), hook_points)
