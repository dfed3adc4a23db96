"""Attention self-repair: do two keys of a softmax row hide each other when ablated one at a time?

The GIM paper's self-repair analysis (``docs/evaluation.md``), per head and query row of a clean run:

* readout per key ``c_j = r·v_j``; the row's output proxy is ``F(S) = Σ_j softmax(S)_j c_j``;
* contributions ``p_j = A_j c_j``; a row is *selected* when at least two keys have ``p_j > τ``;
  ``j1, j2`` are its two largest contributors;
* mean ablation: set ``S_j`` to the mean of the row's unmasked scores ``S̄`` and recompute ``F``:
  ``Δ1``, ``Δ2`` (one key each) and ``Δ12`` (both);
* interaction (self-repair) index ``I = (Δ12 − Δ1 − Δ2) / Δ12`` (0 when ``Δ12 = 0``);
* first-order predictions of ``Δ12``: ``Σ_{j∈{j1,j2}} ∂F/∂S_j · (S_j − S̄)`` with the plain softmax
  gradient and with TSG's (the Jacobian evaluated at ``softmax(S/T)``, no ``1/T``; ``docs/gim.md``).

Readout ``r``: ``"grad"`` (default) uses ``g_z``, the true gradient of the explained logit at the head
output, so ``F`` is the row's first-order effect on that logit; ``"z"`` uses the head output ``z_i``
itself (the research code's choice: ``F = ‖z_i‖²`` at the clean point).

Threshold ``τ``: the paper uses an absolute 1 in readout units. With ``r = g_z`` the units are logits
and their scale depends on the model, so the default is relative: ``τ = rel_threshold × (largest p_j of
any row of the same example)`` with ``rel_threshold = 0.01`` — a row is kept when two of its keys each
carry at least 1% of the example's largest single-key contribution (on SmolLM2 this keeps a few hundred
rows per example, about as many as the paper's rule with ``r = z``; 10% keeps only a handful, dominated
by a few heads). Pass ``threshold=1.0`` (with ``readout="z"``) for the paper's rule.

Everything per row is vectorized (rows × keys tensors, float64); only layers and examples are looped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from gim_tl import stacking
from gim_tl.attribution import deprecated_progress
from gim_tl.evaluation import scipy_stats

Readout = Literal["grad", "z"]

#: Rows whose interaction index exceeds this count as "self-repairing" in :class:`SelfRepairSummary`.
INTERACTION_CUTOFF = 0.1
#: Default relative selection threshold: a key counts when ``p_j`` exceeds this fraction of the largest
#: single-key contribution of any row of the same example.
DEFAULT_REL_THRESHOLD = 0.01


# ---------------------------------------------------------------------------------------------
# Row math (pure)
# ---------------------------------------------------------------------------------------------


def masked_softmax(scores: Float[Tensor, "rows key"], valid: Bool[Tensor, "rows key"],
                   temperature: float = 1.0) -> Float[Tensor, "rows key"]:
    """``softmax(S / T)`` over the valid keys of each row (0 at invalid keys; all-invalid rows give 0)."""
    s = torch.where(valid, scores / temperature, torch.full_like(scores, -math.inf))
    out = torch.softmax(s, dim=-1)
    return torch.nan_to_num(out, nan=0.0)


def readout_value(scores: Float[Tensor, "rows key"], c: Float[Tensor, "rows key"],
                  valid: Bool[Tensor, "rows key"]) -> Float[Tensor, " rows"]:
    """``F(S) = Σ_j softmax(S)_j c_j`` per row."""
    return (masked_softmax(scores, valid) * c).sum(-1)


def softmax_readout_grad(scores: Float[Tensor, "rows key"], c: Float[Tensor, "rows key"],
                         valid: Bool[Tensor, "rows key"], temperature: float = 1.0) -> Float[Tensor, "rows key"]:
    """``∂F/∂S_j`` with the softmax Jacobian evaluated at ``softmax(S/T)``: ``A^T_j (c_j − ⟨A^T, c⟩)``.

    ``T = 1`` is the true gradient; ``T = 2`` is TSG, without the ``1/T`` factor (as the reference code).
    """
    a = masked_softmax(scores, valid, temperature)
    return a * (c - (a * c).sum(-1, keepdim=True))


def interaction_index(d1: Tensor, d2: Tensor, d12: Tensor) -> Tensor:
    """``I = (Δ12 − Δ1 − Δ2) / Δ12``, and 0 where ``Δ12 = 0``."""
    safe = torch.where(d12 == 0, torch.ones_like(d12), d12)
    return torch.where(d12 == 0, torch.zeros_like(d12), (d12 - d1 - d2) / safe)


@dataclass
class RowEffects:
    """Per-row quantities of the self-repair analysis; every tensor field has shape ``[rows]``.

    ``example, layer, head, query`` locate the row; ``p1 ≥ p2`` are its two largest contributions
    (keys ``j1, j2``); ``n_keys`` its unmasked keys. ``plain_pred`` / ``tsg_pred`` predict ``delta12``.
    """

    F: Tensor
    p1: Tensor
    p2: Tensor
    j1: Tensor
    j2: Tensor
    n_keys: Tensor
    delta1: Tensor
    delta2: Tensor
    delta12: Tensor
    interaction: Tensor
    plain_pred: Tensor
    tsg_pred: Tensor
    example: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    layer: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    head: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    query: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def __len__(self) -> int:
        return int(self.F.shape[0])

    def subset(self, keep: Bool[Tensor, " rows"]) -> RowEffects:
        """The rows where ``keep`` is true."""
        return RowEffects(**{f.name: getattr(self, f.name)[keep] if len(getattr(self, f.name)) else
                             getattr(self, f.name) for f in fields(self)})

    @staticmethod
    def concat(parts: Sequence[RowEffects]) -> RowEffects:
        """Rows of several :class:`RowEffects` one after another."""
        if not parts:
            raise ValueError("nothing to concatenate: no rows were analysed")
        return RowEffects(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(RowEffects)})


def row_effects(scores: Float[Tensor, "rows key"], c: Float[Tensor, "rows key"],
                valid: Bool[Tensor, "rows key"], temperature: float = 2.0) -> RowEffects:
    """Ablation effects, interaction index and first-order predictions for every row at once.

    ``scores`` are post-scale attention scores (invalid keys may hold anything), ``c`` the readout per
    key, ``valid`` the unmasked keys. Rows with fewer than two valid keys get ``j2 = j1`` and ``p2 = −inf``
    (they can never be selected). Computed in float64: the Δs are small differences of ``F`` values.
    """
    s = scores.double()
    c = c.double()
    valid = valid.bool()
    a = masked_softmax(s, valid)
    f_clean = (a * c).sum(-1)
    p = torch.where(valid, a * c, torch.full_like(a, -math.inf))
    top = p.topk(min(2, p.shape[-1]), dim=-1)
    j1 = top.indices[:, 0]
    n_keys = valid.sum(-1)
    if p.shape[-1] >= 2:
        j2 = torch.where(n_keys >= 2, top.indices[:, 1], j1)
        p2 = torch.where(n_keys >= 2, top.values[:, 1], torch.full_like(f_clean, -math.inf))
    else:
        j2, p2 = j1, torch.full_like(f_clean, -math.inf)
    p1 = top.values[:, 0]

    mean_score = torch.where(valid, s, torch.zeros_like(s)).sum(-1) / n_keys.clamp(min=1)
    rows = torch.arange(s.shape[0])

    def ablated(*keys: Tensor) -> Tensor:
        s_abl = s.clone()
        for j in keys:
            s_abl[rows, j] = mean_score
        return readout_value(s_abl, c, valid)

    d1 = f_clean - ablated(j1)
    d2 = f_clean - ablated(j2)
    d12 = f_clean - ablated(j1, j2)
    two = n_keys >= 2
    d2 = torch.where(two, d2, torch.zeros_like(d2))
    d12 = torch.where(two, d12, d1)

    def prediction(temp: float) -> Tensor:
        g = softmax_readout_grad(s, c, valid, temp)
        shift = s - mean_score[:, None]
        pred = g[rows, j1] * shift[rows, j1]
        return pred + torch.where(two, g[rows, j2] * shift[rows, j2], torch.zeros_like(pred))

    return RowEffects(F=f_clean, p1=p1, p2=p2, j1=j1, j2=j2, n_keys=n_keys, delta1=d1, delta2=d2, delta12=d12,
                      interaction=interaction_index(d1, d2, d12), plain_pred=prediction(1.0),
                      tsg_pred=prediction(temperature))


# ---------------------------------------------------------------------------------------------
# Selection and summary statistics
# ---------------------------------------------------------------------------------------------


def select_rows(effects: RowEffects, *, threshold: float | None = None,
                rel_threshold: float = DEFAULT_REL_THRESHOLD) -> Tensor:
    """Rows with at least two keys of contribution ``p_j > τ`` (i.e. ``p2 > τ``).

    ``threshold`` is an absolute ``τ`` (the paper: 1 with ``readout="z"``); if ``None``,
    ``τ = rel_threshold ×`` the largest ``p1`` among the rows of the same example.
    """
    if threshold is not None:
        return effects.p2 > threshold
    if len(effects) == 0:
        return torch.zeros(0, dtype=torch.bool)
    ex = effects.example
    n_ex = int(ex.max()) + 1
    biggest = torch.full((n_ex,), -math.inf, dtype=effects.p1.dtype).scatter_reduce(
        0, ex, effects.p1, reduce="amax")
    tau = rel_threshold * biggest[ex]
    return (effects.p2 > tau) & (biggest[ex] > 0)


def spearman(x: Float[Tensor, " n"], y: Float[Tensor, " n"]) -> float:
    """Spearman rank correlation (tied values share the mean of their ranks); NaN for fewer than 3 pairs or
    a constant input, where a rank correlation is undefined."""
    x = x.double().flatten().cpu()
    y = y.double().flatten().cpu()
    if x.shape != y.shape:
        raise ValueError(f"spearman needs two equally long inputs, got {x.numel()} and {y.numel()}")
    if x.numel() < 3 or bool((x == x[0]).all()) or bool((y == y[0]).all()):
        return math.nan
    return float(scipy_stats().spearmanr(x.numpy(), y.numpy()).statistic)


@dataclass(frozen=True)
class SelfRepairSummary:
    """Prevalence of self-repair among selected rows and how well gradients predict joint ablations."""

    n_rows: int
    n_selected: int
    frac_interaction_above: float
    median_interaction: float
    spearman_plain: float
    spearman_tsg: float
    median_ratio_plain: float
    median_ratio_tsg: float
    cutoff: float = INTERACTION_CUTOFF

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def summarize(effects: RowEffects, selected: Bool[Tensor, " rows"] | None = None, *,
              cutoff: float = INTERACTION_CUTOFF, threshold: float | None = None,
              rel_threshold: float = DEFAULT_REL_THRESHOLD) -> SelfRepairSummary:
    """Fraction of selected rows with ``I > cutoff``, median ``I``, Spearman(Δ12, plain / TSG prediction),
    and the median ratio prediction / Δ12 of each (1 = right size; below 1 = the joint effect is
    underestimated). TSG carries no ``1/T``, so its ratio shows scale, Spearman shows ranking."""
    if selected is None:
        selected = select_rows(effects, threshold=threshold, rel_threshold=rel_threshold)
    sel = effects.subset(selected)
    n = len(sel)
    nan = math.nan
    return SelfRepairSummary(
        n_rows=len(effects), n_selected=n,
        frac_interaction_above=float((sel.interaction > cutoff).double().mean()) if n else nan,
        median_interaction=float(sel.interaction.median()) if n else nan,
        spearman_plain=spearman(sel.delta12, sel.plain_pred),
        spearman_tsg=spearman(sel.delta12, sel.tsg_pred),
        median_ratio_plain=_median_ratio(sel.plain_pred, sel.delta12),
        median_ratio_tsg=_median_ratio(sel.tsg_pred, sel.delta12),
        cutoff=cutoff,
    )


def _median_ratio(pred: Tensor, target: Tensor) -> float:
    ok = target != 0
    return float((pred[ok] / target[ok]).median()) if bool(ok.any()) else math.nan


# ---------------------------------------------------------------------------------------------
# Running it on a TransformerLens model
# ---------------------------------------------------------------------------------------------


def _expand_kv(v: Float[Tensor, "batch pos kv d"], n_heads: int) -> Float[Tensor, "batch pos head d"]:
    """Repeat grouped key/value heads so head ``h`` uses kv head ``h // (n_heads / n_kv)`` (HF/TL layout)."""
    n_kv = v.shape[2]
    if n_kv == n_heads:
        return v
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv} key/value heads evenly")
    return v.repeat_interleave(n_heads // n_kv, dim=2)


def head_rows(scores: Float[Tensor, "head q k"], v: Float[Tensor, "k head d"], z: Float[Tensor, "q head d"],
              readout: Float[Tensor, "q head d"], *, temperature: float = 2.0,
              check_tol: float = 1e-3) -> tuple[RowEffects, Int[Tensor, " rows"], Int[Tensor, " rows"]]:
    """:func:`row_effects` for every (head, query) row of one layer of one example.

    ``readout`` is ``g_z`` or ``z``. Checks that ``softmax(scores) @ v`` reproduces the cached ``z``
    (catches a head-layout mismatch). Returns the effects and each row's head and query index.
    """
    n_heads, n_q, n_k = scores.shape
    valid = torch.isfinite(scores) & (scores > -1e30)
    s = scores.double()
    a = masked_softmax(s, valid)
    z_rebuilt = torch.einsum("hqk,khd->qhd", a, v.double())
    err = (z_rebuilt - z.double()).abs().max()
    scale = z.double().abs().max().clamp(min=1e-12)
    if err > check_tol * scale + 1e-6:
        raise ValueError(f"softmax(hook_attn_scores) @ hook_v does not reproduce hook_z (max error {float(err):.3g}); "
                         "the model's attention is not plain softmax(S)·V (value bias? sinks?), so the self-repair "
                         "analysis does not apply to it")
    c = torch.einsum("qhd,khd->hqk", readout.double(), v.double())
    eff = row_effects(s.reshape(n_heads * n_q, n_k), c.reshape(n_heads * n_q, n_k),
                      valid.reshape(n_heads * n_q, n_k), temperature)
    head = torch.arange(n_heads).repeat_interleave(n_q)
    query = torch.arange(n_q).repeat(n_heads)
    return eff, head, query


def _saver(store: dict, name: str):
    """A read-only TL hook (forward or backward) that stores a detached copy under ``name``."""
    def fn(x, hook):
        store[name] = x.detach()
    return fn


def self_repair_rows(model, tokens: Sequence[Int[Tensor, " pos"]] | Int[Tensor, "batch pos"],
                     target_ids: Sequence[int] | Int[Tensor, " batch"], *, readout: Readout = "grad",
                     temperature: float = 2.0, layers: Sequence[int] | None = None,
                     contrast_ids: Sequence[int] | None = None, progress: bool | None = None,
                     show_progress: bool | None = None) -> RowEffects:
    """Run the analysis on every head/query row of every layer, one unpadded example at a time.

    ``tokens``: one 1-D tensor per example (or an unpadded ``[batch, pos]`` tensor). The explained scalar
    is the target logit at the last position (minus the contrast logit if ``contrast_ids``); ``g_z`` is its
    plain autograd gradient at each ``attn.hook_z``. Works for HookedTransformer and TransformerBridge.
    """
    if readout not in ("grad", "z"):
        raise ValueError(f"readout must be 'grad' or 'z', got {readout!r}")
    stacking.use_or_refuse(model, None, "self_repair_rows")   # its g_z must be the plain gradient
    seqs = list(tokens) if not isinstance(tokens, Tensor) or tokens.ndim == 2 else [tokens]
    n_layers = int(model.cfg.n_layers)
    layers = list(range(n_layers)) if layers is None else list(layers)
    device = next(model.parameters()).device
    parts: list[RowEffects] = []
    iterator = enumerate(seqs)
    if deprecated_progress(progress, show_progress, "self_repair_rows", default=False):
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(seqs), desc="self-repair")
    for ex, seq in iterator:
        cache: dict[str, Tensor] = {}
        fwd, bwd = [], []
        for layer in layers:
            for point in ("attn_scores", "v", "z"):
                fwd.append((f"blocks.{layer}.attn.hook_{point}", _saver(cache, f"{layer}.{point}")))
            bwd.append((f"blocks.{layer}.attn.hook_z", _saver(cache, f"{layer}.gz")))
        seq = seq.to(device).reshape(1, -1)
        with model.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
            logits = model(seq)
            metric = logits[0, -1, int(target_ids[ex])]
            if contrast_ids is not None:
                metric = metric - logits[0, -1, int(contrast_ids[ex])]
            metric.backward()
        model.zero_grad(set_to_none=True)
        for layer in layers:
            z = cache[f"{layer}.z"][0]
            v = _expand_kv(cache[f"{layer}.v"], z.shape[1])[0]
            r = cache[f"{layer}.gz"][0] if readout == "grad" else z
            eff, head, query = head_rows(cache[f"{layer}.attn_scores"][0], v, z, r, temperature=temperature)
            eff.example = torch.full_like(head, ex)
            eff.layer = torch.full_like(head, layer)
            eff.head, eff.query = head, query
            parts.append(eff)
    return RowEffects.concat(parts)


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def plot_self_repair(effects: RowEffects, selected: Bool[Tensor, " rows"], path: str, *, title: str = "",
                     top_quantile: float = 0.95):
    """Two scatter panels, like the paper's: (Δ1+Δ2) vs Δ12 with y = x and the top-5% ``I`` rows
    highlighted; plain and TSG first-order predictions vs Δ12 with y = x. Saves a PNG to ``path``."""
    import matplotlib.pyplot as plt

    sel = effects.subset(selected)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    if len(sel):
        summed = (sel.delta1 + sel.delta2).numpy()
        joint = sel.delta12.numpy()
        top = (sel.interaction >= torch.quantile(sel.interaction, top_quantile)).numpy()
        ax = axes[0]
        ax.scatter(summed[~top], joint[~top], s=6, alpha=0.5, label="rows")
        ax.scatter(summed[top], joint[top], s=10, color="crimson", label=f"top {100 * (1 - top_quantile):.0f}% of I")
        _diagonal(ax, summed, joint)
        ax.set_xlabel("Δ1 + Δ2 (sum of single-key ablations)")
        ax.set_ylabel("Δ12 (joint ablation)")
        ax.legend(fontsize=8)
        ax = axes[1]
        ax.scatter(joint, sel.plain_pred.numpy(), s=6, alpha=0.5, label="plain softmax gradient")
        ax.scatter(joint, sel.tsg_pred.numpy(), s=6, alpha=0.5, label="TSG (T=2)")
        _diagonal(ax, joint, torch.cat([sel.plain_pred, sel.tsg_pred]).numpy())
        ax.set_xlabel("Δ12 (joint ablation)")
        ax.set_ylabel("first-order prediction of Δ12")
        ax.legend(fontsize=8)
    fig.suptitle(title or f"attention self-repair ({len(sel)} selected rows)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _diagonal(ax, x, y) -> None:
    import numpy as np

    lo = float(min(np.min(x), np.min(y)))
    hi = float(max(np.max(x), np.max(y)))
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--", label="y = x")
