"""An independent GIM, written apart from ``gim_tl``: the test oracle for ``GIMHookSet``.

A plain-PyTorch forward pass of each test architecture, read directly from the weights (an HF
Llama/Qwen2/Gemma2/GPT-2 model, or a TL 3.9 HookedTransformer), with GIM placed by this file's
own tricks, none of them shared with ``gim_tl``:

* TSG: an autograd Function whose backward multiplies the upstream gradient by the explicit
  softmax Jacobian ``diag(a) − a aᵀ`` at ``a = softmax(S / T)``, built in float64.
* Gradient normalization: ``x.detach() + s · (x − x.detach())`` (value ``x``, gradient ``s``).
* Norm freeze: the statistic (rms or σ) is ``.detach()``ed inside a hand-written norm.

The reference handles causal masking only (no padding); inputs are the token embeddings, so
their gradient (after Gemma's √d scaling, as TL's ``hook_embed``) is what TL users read at ``hook_embed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

# --------------------------------------------------------------------------------------
# Rule switches
# --------------------------------------------------------------------------------------

RULE_NAMES = ("tsg", "freeze_norm", "grad_norm")


@dataclass(frozen=True)
class Rules:
    """Which GIM rules the reference applies, with the paper's constants (T = 2, q/k ¼, v/gate/up ½)."""

    tsg: bool = False
    freeze_norm: bool = False
    grad_norm: bool = False
    temperature: float = 2.0
    q: float = 0.25
    k: float = 0.25
    v: float = 0.5
    gate: float = 0.5
    up: float = 0.5

    @classmethod
    def named(cls, name: str, **constants) -> Rules:
        """``"plain"``, ``"gim"`` (all three rules) or rule names joined by ``+``."""
        if name == "plain":
            on: set[str] = set()
        elif name == "gim":
            on = set(RULE_NAMES)
        else:
            on = set(name.split("+"))
            unknown = on - set(RULE_NAMES)
            if unknown:
                raise ValueError(f"unknown rule(s) {sorted(unknown)}")
        return cls(**{r: r in on for r in RULE_NAMES}, **constants)


# --------------------------------------------------------------------------------------
# The three GIM tricks
# --------------------------------------------------------------------------------------


def softmax_jacobian(a: Float[Tensor, "... key"]) -> Float[Tensor, "... key key"]:
    """``J = diag(a) − a aᵀ``, the Jacobian of softmax at the point whose output is ``a``."""
    return torch.diag_embed(a) - a.unsqueeze(-1) * a.unsqueeze(-2)


def tsg_by_jacobian(
    scores: Float[Tensor, "... key"], grad_pattern: Float[Tensor, "... key"], temperature: float
) -> Float[Tensor, "... key"]:
    """TSG score gradient ``J(softmax(S/T)) · g`` in float64; masked keys (−inf or ≤ finfo.min/2) get 0.

    Rows with no valid key get an all-zero gradient.
    """
    s = scores.double()
    masked = s <= torch.finfo(scores.dtype).min / 2
    logits = (s / temperature).masked_fill(masked, -math.inf)
    valid_row = ~masked.all(-1, keepdim=True)
    a_t = torch.softmax(logits.masked_fill(~valid_row, 0.0), dim=-1) * valid_row
    return (softmax_jacobian(a_t) @ grad_pattern.double().unsqueeze(-1)).squeeze(-1)


class _TSGSoftmax(torch.autograd.Function):
    """Forward: ``softmax(S)``. Backward: the TSG gradient (Jacobian of ``softmax(S/T)``, no 1/T)."""

    @staticmethod
    def forward(ctx, scores, temperature):
        ctx.save_for_backward(scores)
        ctx.temperature = temperature
        return torch.softmax(scores, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        (scores,) = ctx.saved_tensors
        return tsg_by_jacobian(scores, grad, ctx.temperature).to(grad.dtype), None


def attention_softmax(scores: Tensor, rules: Rules) -> Tensor:
    return _TSGSoftmax.apply(scores, rules.temperature) if rules.tsg else torch.softmax(scores, dim=-1)


def grad_times(x: Tensor, s: float) -> Tensor:
    """``x`` exactly, with gradient ``s · upstream``: the gradient-normalization trick."""
    frozen = x.detach()
    return frozen + s * (x - frozen)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float, *, freeze: bool, offset: float = 0.0) -> Tensor:
    """``x / rms(x) · (offset + w)`` in fp32; ``freeze`` detaches ``rms``. Gemma uses ``offset = 1``."""
    xf = x.float()
    rms = (xf.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    if freeze:
        rms = rms.detach()
    y = xf / rms
    return y if weight is None else y * (offset + weight.float())


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, *, freeze: bool) -> Tensor:
    """``(x − μ)/σ · w + b``; ``freeze`` detaches σ only (the centring stays differentiable)."""
    xc = x - x.mean(-1, keepdim=True)
    sigma = (xc.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    if freeze:
        sigma = sigma.detach()
    y = xc / sigma
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


# --------------------------------------------------------------------------------------
# Weights, in one layout for every architecture
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Norm:
    kind: str  # "rms" or "ln"
    eps: float
    weight: Tensor | None = None
    bias: Tensor | None = None
    offset: float = 0.0

    def __call__(self, x: Tensor, rules: Rules) -> Tensor:
        if self.kind == "rms":
            return rms_norm(x, self.weight, self.eps, freeze=rules.freeze_norm, offset=self.offset).to(x.dtype)
        return layer_norm(x, self.weight, self.bias, self.eps, freeze=rules.freeze_norm)


@dataclass(frozen=True)
class Layer:
    """One block. Attention weights per head: ``w_q [head d_model d_head]``, ``w_o [head d_head d_model]``."""

    ln1: Norm
    ln2: Norm
    w_q: Tensor
    w_k: Tensor
    w_v: Tensor
    w_o: Tensor
    w_in: Tensor  # [d_model d_mlp]: the up projection (gated) or the only input projection
    # (gated MLPs here have no b_in, except TL's GatedMLP, which adds it after act(gate)·up)
    w_out: Tensor  # [d_mlp d_model]
    b_q: Tensor | None = None
    b_k: Tensor | None = None
    b_v: Tensor | None = None
    b_o: Tensor | None = None
    w_gate: Tensor | None = None
    b_in: Tensor | None = None
    b_out: Tensor | None = None
    ln1_post: Norm | None = None
    ln2_post: Norm | None = None


@dataclass(frozen=True)
class Arch:
    """A decoder-only transformer as plain tensors plus the few constants its forward needs."""

    w_embed: Tensor  # [vocab d_model]
    layers: tuple[Layer, ...]
    ln_final: Norm
    w_unembed: Tensor  # [d_model vocab]
    act: Callable[[Tensor], Tensor]
    attn_mult: float  # scores = q·k · attn_mult
    b_unembed: Tensor | None = None
    w_pos: Tensor | None = None  # learned positions [n_ctx d_model]
    rotary_base: float | None = None
    embed_scale: Tensor | None = None  # Gemma multiplies the embeddings by √d_model
    softcap: float | None = None


def _heads_in(w: Tensor, n: int) -> Tensor:
    """HF ``Linear.weight [n·d_head, d_model]`` -> ``[n, d_model, d_head]``."""
    return w.detach().reshape(n, -1, w.shape[-1]).transpose(1, 2)


def _opt(x) -> Tensor | None:
    return None if x is None else x.detach()


def from_hf(hf) -> Arch:
    """Read an HF Llama / Qwen2 / Gemma2 / GPT-2 causal LM (eager, unwrapped) into an :class:`Arch`."""
    c = hf.config
    kind = c.model_type
    if kind == "gpt2":
        return _from_hf_gpt2(hf)
    if kind not in ("llama", "qwen2", "gemma2"):
        raise ValueError(f"reference has no {kind}")
    nh, nkv = c.num_attention_heads, c.num_key_value_heads
    dh = getattr(c, "head_dim", None) or c.hidden_size // nh
    gemma = kind == "gemma2"
    rms = lambda m: Norm("rms", c.rms_norm_eps, m.weight.detach(), offset=1.0 if gemma else 0.0)
    layers = []
    for blk in hf.model.layers:
        a, m = blk.self_attn, blk.mlp
        layers.append(Layer(
            ln1=rms(blk.input_layernorm),
            ln2=rms(blk.pre_feedforward_layernorm if gemma else blk.post_attention_layernorm),
            ln1_post=rms(blk.post_attention_layernorm) if gemma else None,
            ln2_post=rms(blk.post_feedforward_layernorm) if gemma else None,
            w_q=_heads_in(a.q_proj.weight, nh), w_k=_heads_in(a.k_proj.weight, nkv),
            w_v=_heads_in(a.v_proj.weight, nkv),
            b_q=None if a.q_proj.bias is None else a.q_proj.bias.detach().reshape(nh, dh),
            b_k=None if a.k_proj.bias is None else a.k_proj.bias.detach().reshape(nkv, dh),
            b_v=None if a.v_proj.bias is None else a.v_proj.bias.detach().reshape(nkv, dh),
            w_o=a.o_proj.weight.detach().T.reshape(nh, dh, -1),
            w_gate=m.gate_proj.weight.detach().T, w_in=m.up_proj.weight.detach().T, w_out=m.down_proj.weight.detach().T,
        ))
    rope = getattr(c, "rope_parameters", None) or {}
    act = (lambda x: F.gelu(x, approximate="tanh")) if gemma else F.silu
    return Arch(
        w_embed=hf.model.embed_tokens.weight.detach(), layers=tuple(layers), ln_final=rms(hf.model.norm),
        w_unembed=hf.lm_head.weight.detach().T, act=act,
        attn_mult=(c.query_pre_attn_scalar ** -0.5) if gemma else dh ** -0.5,
        rotary_base=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
        embed_scale=torch.tensor(c.hidden_size ** 0.5, dtype=hf.model.embed_tokens.weight.dtype) if gemma else None,
        softcap=c.attn_logit_softcapping if gemma else None,
    )


def _from_hf_gpt2(hf) -> Arch:
    c = hf.config
    nh, d = c.n_head, c.n_embd
    dh = d // nh
    ln = lambda m: Norm("ln", c.layer_norm_epsilon, m.weight.detach(), m.bias.detach())
    layers = []
    for blk in hf.transformer.h:
        w, b = blk.attn.c_attn.weight.detach(), blk.attn.c_attn.bias.detach()  # Conv1D: [d, 3d], y = x W + b
        wq, wk, wv = (w[:, i * d:(i + 1) * d].reshape(d, nh, dh).transpose(0, 1) for i in range(3))
        bq, bk, bv = (b[i * d:(i + 1) * d].reshape(nh, dh) for i in range(3))
        layers.append(Layer(
            ln1=ln(blk.ln_1), ln2=ln(blk.ln_2), w_q=wq, w_k=wk, w_v=wv, b_q=bq, b_k=bk, b_v=bv,
            w_o=blk.attn.c_proj.weight.detach().reshape(nh, dh, d), b_o=blk.attn.c_proj.bias.detach(),
            w_in=blk.mlp.c_fc.weight.detach(), b_in=blk.mlp.c_fc.bias.detach(),
            w_out=blk.mlp.c_proj.weight.detach(), b_out=blk.mlp.c_proj.bias.detach(),
        ))
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"reference has no GPT-2 activation {c.activation_function}")
    return Arch(
        w_embed=hf.transformer.wte.weight.detach(), w_pos=hf.transformer.wpe.weight.detach(), layers=tuple(layers),
        ln_final=ln(hf.transformer.ln_f), w_unembed=hf.lm_head.weight.detach().T,
        act=lambda x: F.gelu(x, approximate="tanh"), attn_mult=dh ** -0.5,
    )


_HT_ACTS = {"gelu": F.gelu, "silu": F.silu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
            "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def from_hooked(model) -> Arch:
    """Read a TL 3.9 HookedTransformer (LN/LNPre/RMS/RMSPre, rotary or learned positions) into an :class:`Arch`."""
    cfg = model.cfg
    if cfg.positional_embedding_type not in ("standard", "rotary") or cfg.rotary_adjacent_pairs:
        raise ValueError("reference supports learned positions and NeoX-style (rotate-half) rotary only")
    if not cfg.use_attn_scale or cfg.scale_attn_by_inverse_layer_idx or abs(cfg.attn_scale - cfg.d_head ** 0.5) > 1e-9:
        raise ValueError("reference assumes scores divided by sqrt(d_head)")
    if cfg.positional_embedding_type == "rotary" and cfg.rotary_dim != cfg.d_head:
        raise ValueError("reference rotates the whole head")

    def norm(m) -> Norm:
        name = type(m).__name__
        rms = name.startswith("RMS")
        w = getattr(m, "w", None)
        b = getattr(m, "b", None)
        return Norm("rms" if rms else "ln", cfg.eps, _opt(w), None if rms else _opt(b))

    layers = []
    for blk in model.blocks:
        at, mlp = blk.attn, blk.mlp
        w_k = getattr(at, "_W_K", at.W_K)
        w_v = getattr(at, "_W_V", at.W_V)
        b_k = getattr(at, "_b_K", at.b_K)
        b_v = getattr(at, "_b_V", at.b_V)
        post = cfg.use_normalization_before_and_after
        layers.append(Layer(
            ln1=norm(blk.ln1), ln2=norm(blk.ln2),
            ln1_post=norm(blk.ln1_post) if post else None, ln2_post=norm(blk.ln2_post) if post else None,
            w_q=at.W_Q.detach(), w_k=w_k.detach(), w_v=w_v.detach(), w_o=at.W_O.detach(),
            b_q=at.b_Q.detach(), b_k=b_k.detach(), b_v=b_v.detach(), b_o=at.b_O.detach(),
            w_gate=_opt(getattr(mlp, "W_gate", None)) if cfg.gated_mlp else None,
            w_in=mlp.W_in.detach(), b_in=mlp.b_in.detach(), w_out=mlp.W_out.detach(), b_out=mlp.b_out.detach(),
        ))
    return Arch(
        w_embed=model.W_E.detach(), w_pos=model.W_pos.detach() if cfg.positional_embedding_type == "standard" else None,
        layers=tuple(layers), ln_final=norm(model.ln_final), w_unembed=model.W_U.detach(), b_unembed=model.b_U.detach(),
        act=_HT_ACTS[cfg.act_fn], attn_mult=cfg.d_head ** -0.5,
        rotary_base=float(cfg.rotary_base) if cfg.positional_embedding_type == "rotary" else None,
        softcap=cfg.attn_scores_soft_cap if cfg.attn_scores_soft_cap > 0 else None,
    )


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------


def rotate(x: Float[Tensor, "batch pos head d_head"], base: float) -> Float[Tensor, "batch pos head d_head"]:
    """Rotary embedding, rotate-half convention (pairs ``i`` and ``i + d/2``), positions ``0..pos-1``."""
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * inv_freq[None, :]
    angle = torch.cat([angle, angle], dim=-1)[None, :, None, :]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    half = d // 2
    flipped = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + flipped * sin


def _keep(record: dict | None, name: str, x: Tensor) -> Tensor:
    """Store ``x`` under ``name`` with ``retain_grad`` so its gradient can be read after backward."""
    if record is not None and x.requires_grad:
        x.retain_grad()
        record[name] = x
    return x


def _project(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``[b p d] × [h d e] -> [b p h e]`` (+ bias ``[h e]``)."""
    y = torch.einsum("bpd,hde->bphe", x, w)
    return y if b is None else y + b


def attention(layer: Layer, u: Tensor, arch: Arch, rules: Rules, record: dict | None, prefix: str) -> Tensor:
    """Causal multi-head (grouped-query) attention with TSG and the q/k/v factors where ``rules`` say."""
    q = _project(u, layer.w_q, layer.b_q)
    k = _project(u, layer.w_k, layer.b_k)
    v = _project(u, layer.w_v, layer.b_v)
    # Recorded where each TL hook reads its gradient: q and k after their factor, v before it.
    q, k = _keep(record, f"{prefix}.attn.hook_q", q), _keep(record, f"{prefix}.attn.hook_k", k)
    if rules.grad_norm:
        q, k, v = grad_times(q, rules.q), grad_times(k, rules.k), grad_times(v, rules.v)
    v = _keep(record, f"{prefix}.attn.hook_v", v)
    if arch.rotary_base is not None:
        q, k = rotate(q, arch.rotary_base), rotate(k, arch.rotary_base)
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhe,bkhe->bhqk", q, k) * arch.attn_mult
    if arch.softcap is not None:
        scores = arch.softcap * torch.tanh(scores / arch.softcap)
    n = scores.shape[-1]
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    scores = _keep(record, f"{prefix}.attn.hook_attn_scores", scores.masked_fill(future, -math.inf))
    pattern = _keep(record, f"{prefix}.attn.hook_pattern", attention_softmax(scores, rules))
    z = torch.einsum("bhqk,bkhe->bqhe", pattern, v)
    out = torch.einsum("bqhe,hed->bqd", z, layer.w_o)
    return out if layer.b_o is None else out + layer.b_o


def mlp(layer: Layer, u: Tensor, arch: Arch, rules: Rules, record: dict | None = None, prefix: str = "") -> Tensor:
    """Gated (``act(u W_gate) ⊙ u W_in``, both branches ×½ under grad norm) or plain MLP (never scaled).

    Recorded (gated): ``mlp.hook_pre``/``hook_pre_linear`` below the ½ (their gradients carry it),
    ``mlp.hook_post`` the product (+ ``b_in``).
    """
    up = u @ layer.w_in
    if layer.w_gate is None:
        hidden = arch.act(up if layer.b_in is None else up + layer.b_in)
    else:
        gate = _keep(record, f"{prefix}.mlp.hook_pre", u @ layer.w_gate)
        up = _keep(record, f"{prefix}.mlp.hook_pre_linear", up)
        if rules.grad_norm:
            gate, up = grad_times(gate, rules.gate), grad_times(up, rules.up)
        hidden = arch.act(gate) * up
        if layer.b_in is not None:
            hidden = hidden + layer.b_in
        hidden = _keep(record, f"{prefix}.mlp.hook_post", hidden)
    out = hidden @ layer.w_out
    return out if layer.b_out is None else out + layer.b_out


def forward(
    arch: Arch, embeds: Float[Tensor, "batch pos d_model"], rules: Rules, record: dict | None = None
) -> Float[Tensor, "batch pos vocab"]:
    """Logits from token embeddings ``W_E[tokens]`` under ``rules``.

    ``record`` (a dict) receives retained intermediates under TL hook names (``blocks.0.hook_resid_pre``,
    ``blocks.0.attn.hook_q`` (its gradient is the one *after* the ¼), ``...hook_attn_scores``,
    ``...mlp.hook_pre/_pre_linear/_post`` (gated MLPs; gate and up after the ½),
    ``ln_final.hook_in``: the last residual, whose only reader is the final norm).
    """
    h = embeds if arch.embed_scale is None else embeds * arch.embed_scale
    h = _keep(record, "hook_embed", h)  # TL's hook_embed is after Gemma's √d scaling
    if arch.w_pos is not None:
        h = h + arch.w_pos[: h.shape[1]]
    for i, layer in enumerate(arch.layers):
        prefix = f"blocks.{i}"
        h = _keep(record, f"{prefix}.hook_resid_pre", h)
        attn_out = attention(layer, layer.ln1(h, rules), arch, rules, record, prefix)
        if layer.ln1_post is not None:
            attn_out = layer.ln1_post(attn_out, rules)
        h = h + attn_out
        mlp_out = mlp(layer, layer.ln2(h, rules), arch, rules, record, prefix)
        if layer.ln2_post is not None:
            mlp_out = layer.ln2_post(mlp_out, rules)
        h = h + mlp_out
    h = _keep(record, "ln_final.hook_in", h)
    logits = arch.ln_final(h, rules) @ arch.w_unembed
    return logits if arch.b_unembed is None else logits + arch.b_unembed


def input_grad(
    arch: Arch, tokens: Tensor, rules: Rules, direction: Float[Tensor, "batch pos vocab"]
) -> tuple[Tensor, Tensor, dict]:
    """``(logits, gradient of ⟨logits, direction⟩ at hook_embed, record)`` for token ids under ``rules``."""
    embeds = arch.w_embed[tokens].detach().clone().requires_grad_(True)
    record: dict = {}
    logits = forward(arch, embeds, rules, record)
    (logits * direction).sum().backward()
    return logits.detach(), record["hook_embed"].grad, record
