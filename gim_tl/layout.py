"""Where GIM's rules sit in a TransformerLens model: the hook points of each layer and norm.

Works for TL 3.9 ``HookedTransformer`` and for ``TransformerBridge`` (TL 3.9 and 4.x) over HF
models. Anything GIM cannot use raises :class:`GIMModelError` naming what is missing and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


class GIMModelError(ValueError):
    """The model's hook points cannot carry a GIM rule."""


Kind = Literal["hooked", "bridge"]


@dataclass(frozen=True)
class NormSite:
    """One LayerNorm/RMSNorm, by its hook-point prefix (``blocks.0.ln1``, ``ln_final``, ...).

    ``strategy`` says how the statistic is frozen:
    * ``"detach"``: ``hook_scale`` is in the graph (HookedTransformer): detach it in forward.
    * ``"correct"``: the norm may run HF's own kernel, whose ``hook_scale`` is a side value
      (TransformerBridge): fix the gradient at ``hook_in`` with ``rules.frozen_norm_grad``.
    """

    prefix: str
    strategy: Literal["detach", "correct"]
    centered: bool = False
    bias: torch.Tensor | None = None


@dataclass(frozen=True)
class LayerSites:
    """The hook points of one transformer block."""

    layer: int
    gated_mlp: bool

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


def _bridge_norm(model, hook_points: dict, prefix: str) -> NormSite:
    _require(model, hook_points, [f"{prefix}.hook_in", f"{prefix}.hook_out"], f"the norm freeze at {prefix}")
    module = model.get_submodule(prefix)
    rms = bool(getattr(module, "uses_rms_norm", False))
    original = getattr(module, "original_component", None)
    bias = None if rms else getattr(original, "bias", None)
    return NormSite(prefix, "correct", centered=not rms, bias=bias)


def discover(model) -> ModelLayout:
    """Find every site GIM modifies, or raise :class:`GIMModelError` saying why it cannot."""
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
        else:
            gated = bool(cfg.gated_mlp)
            if gated:
                _require(model, hook_points, [f"{prefix}.mlp.hook_pre_linear"], f"the gated MLP of layer {layer}")
        layers.append(LayerSites(layer, gated))

    norms = []
    for name in [n for n in hook_points if n.endswith(".hook_scale")]:
        prefix = name[: -len(".hook_scale")]
        norms.append(NormSite(prefix, "detach") if kind == "hooked" else _bridge_norm(model, hook_points, prefix))
    return ModelLayout(kind, tuple(layers), tuple(norms), hook_points)
