"""GIM settings: which rules are on, with what constants, and the paper's eight ablation presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

TSGSource = Literal["auto", "pattern", "scores"]


@dataclass(frozen=True)
class GIMConfig:
    """Every knob of GIM (the rules are defined in :mod:`gim_tl.rules`). The defaults are full GIM (Edin et al.
    2025, arXiv:2505.17630): TSG at T = 2, every norm frozen, q/k ×¼, v ×½, gate/up ×½.

    Attributes:
        tsg: evaluate the attention-softmax Jacobian at ``softmax(S / temperature)``.
        temperature: the TSG temperature T (2.0). T = 1 reproduces plain backprop.
        freeze_norm: treat every LayerNorm/RMSNorm statistic as a constant in backward
            (pre-attention, pre-MLP, final and Gemma-2 post norms).
        grad_norm: scale the gradients at q, k, v and at a gated MLP's gate and up branches.
        q_scale, k_scale, v_scale, gate_scale, up_scale: the gradient-normalization factors.
        use_triton: use the fused Triton TSG kernel for CUDA tensors (PyTorch elsewhere).
        tsg_source: recompute ``softmax(S/T)`` from the saved pattern (no extra memory) or from
            the scores. ``"auto"`` uses the pattern except for fp16 patterns, whose underflow
            below 6e-8 drops keys that still carry weight at T = 2 (see ``gim_tl.kernel``).
    """

    tsg: bool = True
    temperature: float = 2.0
    freeze_norm: bool = True
    grad_norm: bool = True
    q_scale: float = 0.25
    k_scale: float = 0.25
    v_scale: float = 0.5
    gate_scale: float = 0.5
    up_scale: float = 0.5
    use_triton: bool = True
    tsg_source: TSGSource = "auto"

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.tsg_source not in ("auto", "pattern", "scores"):
            raise ValueError(f"tsg_source must be 'auto', 'pattern' or 'scores', got {self.tsg_source!r}")

    @property
    def is_plain(self) -> bool:
        """True when no rule is on: the hook set then leaves autograd untouched."""
        return not (self.tsg or self.freeze_norm or self.grad_norm)

    @property
    def qk_on_scores(self) -> bool:
        """True when q's and k's factor is applied once, to the score gradient (they are equal).

        The scores are ``q·kᵀ`` (after rotary) times a constant, then soft-capped and masked: all
        linear in backward, so scaling their gradient by ``s`` scales what reaches q and k by exactly
        ``s``. A gradient read at ``hook_q``/``hook_k`` then already carries the factor.
        """
        return self.grad_norm and self.q_scale == self.k_scale

    @property
    def gate_up_on_product(self) -> bool:
        """True when the gate and up factors are applied once, to the gradient entering ``act(gate) · up``.

        With ``h = act(gate) · up``, ``∂h/∂gate = act'(gate) · up`` and ``∂h/∂up = act(gate)``: both
        branches' gradients are linear in ``h``'s, so scaling it by ``s`` scales each by exactly ``s``.
        A gradient read at ``mlp.hook_pre``/``hook_pre_linear`` then already carries the factor.
        """
        return self.grad_norm and self.gate_scale == self.up_scale

    def scale_after_hook(self, which: str) -> float:
        """The factor still to be applied to a gradient read at ``attn.hook_{which}`` (q, k or v), or at
        ``mlp.hook_pre`` (``"gate"``) or ``mlp.hook_pre_linear`` (``"up"``).

        1 where the read gradient already carries it (q, k on the score gradient; gate, up on the
        product's gradient) or grad norm is off.
        """
        if not self.grad_norm or (which in ("q", "k") and self.qk_on_scores) or (
                which in ("gate", "up") and self.gate_up_on_product):
            return 1.0
        return getattr(self, f"{which}_scale")

    def replace(self, **changes) -> GIMConfig:
        return dataclasses.replace(self, **changes)


#: The ablation variants of the paper's table, by the rules they switch on.
PRESETS: dict[str, GIMConfig] = {
    "plain": GIMConfig(tsg=False, freeze_norm=False, grad_norm=False),
    "freeze_norm": GIMConfig(tsg=False, freeze_norm=True, grad_norm=False),
    "grad_norm": GIMConfig(tsg=False, freeze_norm=False, grad_norm=True),
    "tsg": GIMConfig(tsg=True, freeze_norm=False, grad_norm=False),
    "grad_norm+tsg": GIMConfig(tsg=True, freeze_norm=False, grad_norm=True),
    "freeze_norm+tsg": GIMConfig(tsg=True, freeze_norm=True, grad_norm=False),
    "freeze_norm+grad_norm": GIMConfig(tsg=False, freeze_norm=True, grad_norm=True),
    "gim": GIMConfig(),
}

#: The names the paper's tables use for the same presets.
PRESET_LABELS: dict[str, str] = {
    "plain": "Gradient × Input",
    "freeze_norm": "+ LN freeze",
    "grad_norm": "+ Grad norm",
    "tsg": "+ TSG",
    "grad_norm+tsg": "+ Grad norm + TSG",
    "freeze_norm+tsg": "+ LN freeze + TSG",
    "freeze_norm+grad_norm": "+ Grad norm + LN freeze",
    "gim": "GIM",
}


def preset(name: str) -> GIMConfig:
    """The :class:`GIMConfig` of a named ablation preset (see :data:`PRESETS`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown GIM preset {name!r}; choose one of {sorted(PRESETS)}") from None
