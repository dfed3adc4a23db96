"""Token attributions of one logit: GIM, its ablation presets, gradient × input and integrated gradients.

The explained scalar is the logit of a target token at one position (as in the GIM paper), or a logit
difference ``logit[target] − logit[contrast]``. A token's score is

    score_i = Σ_d (e_i − e′_i)_d · g̃_i,d

with ``e`` the token embeddings at ``hook_embed``, ``e′`` a baseline and ``g̃`` the gradient of the
scalar w.r.t. ``e``: the GIM gradient (a :class:`~gim_tl.hookset.GIMHookSet` attached during forward
and backward), plain autograd (``"plain"`` = ``"grad_x_input"``), or for ``"integrated_gradients"``
the plain gradient averaged along the straight line from ``e′`` to ``e``.

:func:`attribute_tokens` returns a :class:`TokenAttribution`, which displays itself as an HTML
heatmap in notebooks and renders figures, tables and DataFrames (:mod:`gim_tl.views`).
:func:`compare` puts several methods side by side.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from gim_tl import stacking, views
from gim_tl.config import PRESET_LABELS
from gim_tl.hookset import GIMHookSet

#: Method names :func:`attribute_tokens` accepts: every GIM preset (the rule-free one is called
#: ``"grad_x_input"``; ``"plain"`` is a deprecated alias of it) and ``"integrated_gradients"``.
METHODS: tuple[str, ...] = (*stacking.GRADIENT_METHODS, "integrated_gradients")

#: Display names of the methods (the paper's table names for the presets).
METHOD_LABELS: dict[str, str] = {**PRESET_LABELS, "grad_x_input": "Gradient × Input",
                                 "integrated_gradients": "Integrated Gradients", "custom": "custom GIM set"}

#: Suffix of a result's label when it was computed with the GIM set already on the model.
ATTACHED_SUFFIX = " (attached set)"

Prompts = str | Sequence[str] | Tensor
TokenSpec = int | str | Tensor | Sequence[int | str] | None
BaselineSpec = str | Tensor
#: Color scale of a view: one for every row (``"shared"``), or one per row (``"row"``).
Scale = Literal["shared", "row"]

#: Default for ``progress``: a bar when integrated gradients runs at least this many path points.
_PROGRESS_MIN_POINTS = 256


# --------------------------------------------------------------------------------------
# Result objects
# --------------------------------------------------------------------------------------


def method_label(method: str) -> str:
    """The display name of a method (``"gim"`` → ``"GIM"``); unknown names are shown as given."""
    return METHOD_LABELS.get(method, method)


@dataclass
class TokenAttribution:
    """Per-token scores of one method for a batch of prompts.

    Attributes:
        tokens: decoded token per position, ``[batch][pos]`` (padding included; see ``mask``).
        token_ids: ``[batch, pos]`` token ids as fed to the model.
        scores: ``[batch, pos]`` float32 scores on CPU; 0 at padded positions.
        mask: ``[batch, pos]`` True at real tokens, False at padding.
        target_ids, contrast_ids: ``[batch]`` explained token ids (``contrast_ids`` None without contrast).
        target_strs, contrast_strs: the same, decoded.
        position: ``[batch]`` column index (into ``tokens``) of the position whose logit is explained.
        method: the method name (see :data:`METHODS`; ``"custom"`` for a hook set of no preset).
        metric_values: ``[batch]`` the explained scalar at the real input.
        baseline: a short description of the baseline used.
        details: method settings (IG steps, ...); ``details["attached_set"]`` is True when the GIM set
            already on the model was used (see :mod:`gim_tl.stacking`); the label then says so.
    """

    tokens: list[list[str]]
    token_ids: Int[Tensor, "batch pos"]
    scores: Float[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]
    target_ids: Int[Tensor, " batch"]
    contrast_ids: Int[Tensor, " batch"] | None
    target_strs: list[str]
    position: Int[Tensor, " batch"]
    method: str
    metric_values: Float[Tensor, " batch"]
    contrast_strs: list[str] | None = None
    baseline: str = ""
    details: dict = field(default_factory=dict)

    # ---- container protocol --------------------------------------------------------------

    def __len__(self) -> int:
        return self.scores.shape[0]

    def __getitem__(self, i: int) -> TokenAttribution:
        """The ``i``-th example as a batch of one."""
        n = len(self)
        if not isinstance(i, int) or not -n <= i < n:
            raise IndexError(f"example index {i!r} out of range for {n} example(s)")
        i = i % n
        pick = slice(i, i + 1)
        return TokenAttribution(
            tokens=[self.tokens[i]], token_ids=self.token_ids[pick], scores=self.scores[pick], mask=self.mask[pick],
            target_ids=self.target_ids[pick],
            contrast_ids=None if self.contrast_ids is None else self.contrast_ids[pick],
            target_strs=[self.target_strs[i]], position=self.position[pick], method=self.method,
            metric_values=self.metric_values[pick],
            contrast_strs=None if self.contrast_strs is None else [self.contrast_strs[i]],
            baseline=self.baseline, details=dict(self.details))

    # ---- per-example pieces the views use ------------------------------------------------

    @property
    def label(self) -> str:
        return method_label(self.method) + (ATTACHED_SUFFIX if self.details.get("attached_set") else "")

    def real_positions(self, i: int) -> list[int]:
        """Column indices of example ``i``'s real (non-padding) tokens."""
        return torch.nonzero(self.mask[i], as_tuple=False).flatten().tolist()

    def real_tokens(self, i: int) -> list[str]:
        return [self.tokens[i][p] for p in self.real_positions(i)]

    def real_scores(self, i: int) -> list[float]:
        return self.scores[i, self.real_positions(i)].tolist()

    def explained(self, i: int) -> str:
        """What example ``i`` explains, e.g. ``logit(' Paris') − logit(' Rome') at position 4``."""
        text = f"logit({self.target_strs[i]!r})"
        if self.contrast_strs is not None:
            text += f" − logit({self.contrast_strs[i]!r})"
        col = int(self.position[i])
        real = self.real_positions(i)
        return f"{text} at position {real.index(col) if col in real else col}"

    def caption(self, i: int) -> str:
        prefix = f"#{i}: " if len(self) > 1 else ""
        return f"{prefix}{self.explained(i)} = {float(self.metric_values[i]):.3f}"

    def _blocks(self) -> list[views.HeatmapBlock]:
        return [views.HeatmapBlock(self.real_tokens(i), [("", self.real_scores(i))],
                                   caption=self.caption(i) if len(self) > 1 else "")
                for i in range(len(self))]

    def title(self, with_baseline: bool = True) -> str:
        base = f"  (baseline: {self.baseline})" if self.baseline and with_baseline else ""
        if len(self) == 1:
            return f"{self.label}: {self.explained(0)} = {float(self.metric_values[0]):.3f}{base}"
        return f"{self.label} token attributions{base}"

    def _normalize(self, scale: Scale | None = None) -> views.Normalize:
        """``scale`` None: one example in score units, several each scaled to its own max |score|."""
        if scale is None:
            return "global" if len(self) == 1 else "row"
        return _normalize(scale)

    # ---- views -----------------------------------------------------------------------------

    def _repr_html_(self, scale: Scale | None = None) -> str:
        return views.html_heatmap(self._blocks(), title=self.title(), normalize=self._normalize(scale),
                                  positions=[self.real_positions(i) for i in range(len(self))])

    def to_html(self, path: str | Path | None = None, *, scale: Scale | None = None) -> str:
        """The HTML heatmap (one row per example) as a string; also written to ``path`` as a page.

        ``scale``: ``"shared"`` (one color scale for all examples), ``"row"`` (each example its own);
        default: shared for one example, per row for several.
        """
        return _write_html(self._repr_html_(scale), path, self.title())

    def plot(self, ax=None, *, max_width: float = 100.0, scale: Scale | None = None):
        """A matplotlib ``Figure``: tokens along x (wrapped), cells colored by score, one strip per example.

        ``scale`` as in :meth:`to_html`.
        """
        return views.heatmap_figure(self._blocks(), title=self.title(with_baseline=False),
                                    normalize=self._normalize(scale), ax=ax, max_width=max_width,
                                    note=_baseline_note([self]))

    def save_png(self, path: str | Path, *, dpi: int = 150, scale: Scale | None = None) -> Path:
        """Render :meth:`plot` into a PNG file and return its path."""
        return _save_png(self.plot(scale=scale), path, dpi)

    def to_dataframe(self):
        """pandas DataFrame, long format: one row per real token (example, position, token, token_id, score, ...)."""
        import pandas as pd

        rows = []
        for i in range(len(self)):
            for p in self.real_positions(i):
                rows.append(dict(example=i, position=p, token=self.tokens[i][p], token_id=int(self.token_ids[i, p]),
                                 score=float(self.scores[i, p]), method=self.method, target=self.target_strs[i]))
        return pd.DataFrame(rows, columns=["example", "position", "token", "token_id", "score", "method", "target"])

    def __str__(self) -> str:
        parts = []
        for i in range(len(self)):
            title = f"{self.label}: {self.caption(i)}" + (f" (baseline: {self.baseline})" if self.baseline else "")
            parts.append(views.text_table(self.real_tokens(i), [(self.label, self.real_scores(i))], title=title,
                                          positions=list(range(len(self.real_positions(i))))))
        return "\n\n".join(parts)

    def __repr__(self) -> str:
        return (f"TokenAttribution(method={self.method!r}, batch={len(self)}, pos={self.scores.shape[1]}, "
                f"targets={self.target_strs!r})")


@dataclass
class Comparison:
    """Several methods' attributions of the same prompts and targets, side by side."""

    results: list[TokenAttribution]

    def __post_init__(self) -> None:
        if not self.results:
            raise ValueError("compare() needs at least one TokenAttribution")
        first = self.results[0]
        for r in self.results[1:]:
            same = (r.token_ids.shape == first.token_ids.shape and torch.equal(r.token_ids, first.token_ids)
                    and torch.equal(r.mask, first.mask) and torch.equal(r.target_ids, first.target_ids)
                    and torch.equal(r.position, first.position)
                    and (r.contrast_ids is None) == (first.contrast_ids is None)
                    and (r.contrast_ids is None or torch.equal(r.contrast_ids, first.contrast_ids)))
            if not same:
                raise ValueError(f"compare() needs results for the same prompts, targets and positions; "
                                 f"{r.method!r} differs from {first.method!r}")

    @property
    def labels(self) -> list[str]:
        """Display names, made unique (``GIM``, ``GIM (2)``) when a method appears twice."""
        seen: dict[str, int] = {}
        out = []
        for r in self.results:
            seen[r.label] = seen.get(r.label, 0) + 1
            out.append(r.label if seen[r.label] == 1 else f"{r.label} ({seen[r.label]})")
        return out

    @property
    def methods(self) -> list[str]:
        return [r.method for r in self.results]

    def __len__(self) -> int:
        return len(self.results[0])

    def __getitem__(self, i: int) -> Comparison:
        return Comparison([r[i] for r in self.results])

    def _block(self, i: int) -> views.HeatmapBlock:
        first = self.results[0]
        rows = [(label, r.real_scores(i)) for label, r in zip(self.labels, self.results, strict=True)]
        return views.HeatmapBlock(first.real_tokens(i), rows, caption=first.caption(i) if len(self) > 1 else "")

    def title(self, i: int | None = None, with_baseline: bool = True) -> str:
        first = self.results[0]
        base = f"  ({_baseline_note(self.results)})" if with_baseline and _baseline_note(self.results) else ""
        if len(self) == 1 or i is not None:
            k = 0 if i is None else i
            return f"{' vs '.join(self.labels)}\n{first.explained(k)} = {float(first.metric_values[k]):.3f}{base}"
        return f"{' vs '.join(self.labels)}: token attributions{base}"

    def _repr_html_(self, scale: Scale = "shared") -> str:
        first = self.results[0]
        return views.html_heatmap([self._block(i) for i in range(len(self))], title=self.title(),
                                  normalize=_normalize(scale),
                                  positions=[first.real_positions(i) for i in range(len(self))])

    def to_html(self, path: str | Path | None = None, *, scale: Scale = "shared") -> str:
        """HTML: per example, one heatmap row per method, each token's score under it.

        ``scale="shared"`` (default): one color scale for every method, so colors compare across rows;
        ``"row"``: each method's row scaled to its own max |score|. The legend says which.
        """
        return _write_html(self._repr_html_(scale), path, self.title())

    def plot(self, ax=None, *, example: int | None = None, max_width: float = 100.0, scale: Scale = "shared"):
        """A ``Figure`` with one heatmap strip per method over the same tokens; all examples unless ``example``.

        ``scale`` as in :meth:`to_html` (default: one color scale shared by all methods).
        """
        picks = range(len(self)) if example is None else [example]
        blocks = [self._block(i) for i in picks]
        if example is not None:
            blocks = [views.HeatmapBlock(b.tokens, b.rows) for b in blocks]
        return views.heatmap_figure(blocks, title=self.title(example, with_baseline=False),
                                    normalize=_normalize(scale), ax=ax, max_width=max_width,
                                    note=_baseline_note(self.results))

    def save_png(self, path: str | Path, *, example: int | None = None, dpi: int = 150,
                 scale: Scale = "shared") -> Path:
        return _save_png(self.plot(example=example, scale=scale), path, dpi)

    def to_dataframe(self):
        """pandas DataFrame: one row per real token, one score column per method (named by its label)."""

        first = self.results[0]
        frame = first.to_dataframe()[["example", "position", "token", "token_id", "target"]].copy()
        for label, r in zip(self.labels, self.results, strict=True):
            frame[label] = r.to_dataframe()["score"].to_numpy()
        return frame

    def __str__(self) -> str:
        first = self.results[0]
        parts = []
        for i in range(len(self)):
            cols = [(label, r.real_scores(i)) for label, r in zip(self.labels, self.results, strict=True)]
            title = first.caption(i) + (f" (baseline: {first.baseline})" if first.baseline else "")
            parts.append(views.text_table(first.real_tokens(i), cols, title=title,
                                          positions=list(range(len(cols[0][1])))))
        return "\n\n".join(parts)

    def __repr__(self) -> str:
        return f"Comparison(methods={self.methods!r}, batch={len(self)})"


def compare(*results: TokenAttribution) -> Comparison:
    """Put attributions of the same prompts and targets by different methods side by side."""
    if len(results) == 1 and isinstance(results[0], (list, tuple)):
        results = tuple(results[0])
    for r in results:
        if not isinstance(r, TokenAttribution):
            raise TypeError(f"compare() takes TokenAttribution objects, got {type(r).__name__}")
    unique: list[TokenAttribution] = []
    for r in results:
        if any(u.label == r.label and u.baseline == r.baseline and u.details == r.details
               and u.scores.shape == r.scores.shape and torch.equal(u.scores, r.scores) for u in unique):
            warnings.warn(f"compare(): {r.label} appears twice with equal scores (the same method); shown once",
                          UserWarning, stacklevel=2)
            continue
        unique.append(r)
    return Comparison(unique)


def _normalize(scale: Scale) -> views.Normalize:
    if scale not in ("shared", "row"):
        raise ValueError(f"scale must be 'shared' (one color scale for all rows) or 'row' (each row its own), "
                         f"got {scale!r}")
    return "global" if scale == "shared" else "row"


def _baseline_note(results: Sequence[TokenAttribution]) -> str:
    """``"baseline: space"`` when all results share a named baseline, else empty."""
    names = {r.baseline for r in results}
    return f"baseline: {names.pop()}" if len(names) == 1 and results[0].baseline else ""


def _write_html(fragment: str, path: str | Path | None, title: str) -> str:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(views.html_page(fragment, title), encoding="utf-8")
    return fragment


def _save_png(fig, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    views.save_figure(fig, path, dpi=dpi)
    return path


# --------------------------------------------------------------------------------------
# Inputs: tokens, positions, targets, baselines
# --------------------------------------------------------------------------------------


def _device(model) -> torch.device:
    device = getattr(model.cfg, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


def _tokenizer(model, why: str):
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError(f"this model has no tokenizer, so {why}. Pass token ids instead "
                         "(a LongTensor [batch, pos], a token id as int), or load it with a tokenizer.")
    return tok


def prepare_tokens(model, prompts: Prompts, attention_mask: Tensor | None = None, prepend_bos: bool = False
                   ) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """Token ids and a real-token mask from strings (left-padded) or from given ids; validated."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, Tensor):
        if prompts.is_floating_point() or prompts.is_complex():
            raise TypeError(f"token ids must be an integer tensor, got dtype {prompts.dtype}")
        if prompts.ndim not in (1, 2):
            raise ValueError(f"token ids must have shape [pos] or [batch, pos], got {tuple(prompts.shape)}")
        tokens = prompts.reshape(1, -1) if prompts.ndim == 1 else prompts
        if attention_mask is None:
            mask = torch.ones_like(tokens, dtype=torch.bool)
        else:
            mask = attention_mask.reshape(1, -1) if attention_mask.ndim == 1 else attention_mask
            if mask.shape != tokens.shape:
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                                 f"the tokens {tuple(tokens.shape)}: they must match")
            mask = mask.bool()
    elif isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts):
        if attention_mask is not None:
            raise ValueError("attention_mask is only used with token-id input; strings are padded for you")
        _tokenizer(model, "text prompts cannot be tokenized")
        empty = [i for i, p in enumerate(prompts) if p == ""]
        if empty:
            raise ValueError(f"prompt(s) {empty} are empty strings: there is nothing to attribute")
        from gim_tl.models import tokens_for

        tokens, mask = tokens_for(model, list(prompts), prepend_bos=prepend_bos, padding_side="left")
        mask = mask.bool()
    else:
        raise TypeError("prompts must be a string, a non-empty list of strings, or a LongTensor of token ids; "
                        f"got {type(prompts).__name__}")

    if tokens.shape[1] == 0:
        raise ValueError("the prompt has no tokens: there is nothing to attribute")
    empty_rows = (~mask.any(-1)).nonzero().flatten().tolist()
    if empty_rows:
        raise ValueError(f"row(s) {empty_rows} have no real token (fully padded or empty prompt); remove them")
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None and tokens.shape[1] > n_ctx:
        raise ValueError(f"the prompt is {tokens.shape[1]} tokens long, more than the model's context of {n_ctx}; "
                         "shorten it")
    d_vocab = int(model.cfg.d_vocab)
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= d_vocab):
        raise ValueError(f"token ids must lie in [0, {d_vocab}); got min {int(tokens.min())}, max {int(tokens.max())}")
    device = _device(model)
    return tokens.to(device), mask.to(device)


def resolve_positions(mask: Bool[Tensor, "batch pos"], position: int) -> Int[Tensor, " batch"]:
    """Column of the explained position per row, counted over real tokens only.

    ``position = -1`` is each row's last real token (column −1 with left padding, the last
    unmasked column with right padding); ``0`` its first real token.
    """
    if not isinstance(position, int):
        raise TypeError(f"position must be an int, got {type(position).__name__}")
    cols = []
    for i, row in enumerate(mask):
        real = torch.nonzero(row, as_tuple=False).flatten()
        if not -len(real) <= position < len(real):
            raise ValueError(f"position {position} is out of range for example {i}, which has {len(real)} tokens")
        cols.append(int(real[position]))
    return torch.tensor(cols, dtype=torch.long, device=mask.device)


def _one_token_id(model, item, what: str) -> int:
    if isinstance(item, Tensor):
        if item.numel() != 1 or item.is_floating_point():
            raise ValueError(f"{what} tensor entries must be single integer token ids, got {item!r}")
        return int(item.item())
    if isinstance(item, bool):
        raise TypeError(f"{what} must be a token id, a one-token string or None, got a bool")
    if isinstance(item, int):
        return item
    if isinstance(item, str):
        tok = _tokenizer(model, f"the {what} string {item!r} cannot be tokenized")
        ids = list(tok(item, add_special_tokens=False)["input_ids"])
        if len(ids) != 1:
            pieces = [tok.decode([t]) for t in ids]
            hint = " Most words need their leading space, e.g. ' Paris'." if not item.startswith(" ") else ""
            raise ValueError(f"{what} {item!r} is {len(ids)} tokens {pieces}, not one: give a single token "
                             f"(or its id).{hint}")
        return int(ids[0])
    raise TypeError(f"{what} must be a token id, a one-token string, a list of those, or None; "
                    f"got {type(item).__name__}")


def resolve_token_ids(model, spec: TokenSpec, batch: int, what: str = "target") -> Int[Tensor, " batch"] | None:
    """Per-example token ids from an id, a one-token string, a list/tensor of those, or None (→ None)."""
    if spec is None:
        return None
    if isinstance(spec, (int, str)) or (isinstance(spec, Tensor) and spec.ndim == 0):
        items = [spec] * batch
    elif isinstance(spec, Tensor) and spec.is_floating_point():
        raise TypeError(f"{what} must be a token id (int), a one-token string, a list of those, or None; got a "
                        f"{spec.dtype} tensor. Token ids are integers: pass a LongTensor")
    elif not isinstance(spec, (Tensor, Sequence)):
        raise TypeError(f"{what} must be a token id (int), a one-token string, a list of those, or None; got "
                        f"{type(spec).__name__} {spec!r}" + (f". Did you mean {what}={int(spec)}?"
                                                             if isinstance(spec, float) and spec.is_integer() else ""))
    else:
        items = list(spec.flatten()) if isinstance(spec, Tensor) else list(spec)
        if len(items) != batch:
            raise ValueError(f"{what} has {len(items)} entries for {batch} example(s): give one per example")
    ids = torch.tensor([_one_token_id(model, item, what) for item in items], dtype=torch.long)
    d_vocab = int(model.cfg.d_vocab)
    bad = [int(t) for t in ids if not 0 <= int(t) < d_vocab]
    if bad:
        raise ValueError(f"{what} id(s) {bad} are outside the vocabulary [0, {d_vocab})")
    return ids.to(_device(model))


def embed_tokens(model, token_ids: Int[Tensor, "..."]) -> Float[Tensor, "... d_model"]:
    """Token embeddings as ``hook_embed`` sees them (``model.embed``), without gradient."""
    with torch.no_grad():
        return model.embed(token_ids.reshape(1, -1)).reshape(*token_ids.shape, -1)


def baseline_embeddings(model, baseline: BaselineSpec, tokens: Int[Tensor, "batch pos"],
                        embeds: Float[Tensor, "batch pos d_model"]) -> tuple[Float[Tensor, "batch pos d_model"], str]:
    """The baseline ``e′`` for every position, and a short name for it.

    ``"space"``: the embedding of the single token ``tokenizer(" ")`` at every position (the GIM paper's baseline);
    ``"pad"``: the pad token's; ``"zero"``: zeros; or a tensor broadcastable to ``[batch, pos, d_model]``.
    """
    shape = embeds.shape
    if isinstance(baseline, Tensor):
        if not baseline.is_floating_point():
            raise TypeError(f"a baseline tensor holds embeddings and must be floating point, got {baseline.dtype}")
        try:
            ok = torch.broadcast_shapes(baseline.shape, shape) == shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"baseline has shape {tuple(baseline.shape)}, which does not broadcast to "
                             f"[batch, pos, d_model] = {tuple(shape)}")
        return baseline.to(embeds.device, embeds.dtype).expand(shape).clone(), "custom"
    if baseline == "zero":
        return torch.zeros_like(embeds), "zero"
    if baseline in ("space", "pad"):
        tok = _tokenizer(model, f"the {baseline!r} baseline has no token (use baseline='zero' or a tensor)")
        if baseline == "space":
            ids = list(tok(" ", add_special_tokens=False)["input_ids"])
            if len(ids) != 1:
                raise ValueError(f"the tokenizer encodes ' ' as {len(ids)} tokens, so there is no space-token "
                                 "baseline; use baseline='pad', 'zero' or an embedding tensor")
            token_id = int(ids[0])
        else:
            if tok.pad_token_id is None:
                raise ValueError("the tokenizer has no pad token; use baseline='space', 'zero' or a tensor")
            token_id = int(tok.pad_token_id)
        row = embed_tokens(model, torch.tensor([token_id], device=tokens.device))[0]
        return row.to(embeds.dtype).expand(shape).clone(), baseline
    raise ValueError(f"baseline must be 'space', 'pad', 'zero' or a tensor broadcastable to {tuple(shape)}; "
                     f"got {baseline!r}")


def _decode(model, ids: Sequence[int]) -> list[str]:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return [f"<{int(t)}>" for t in ids]
    return [tok.decode([int(t)]) for t in ids]


# --------------------------------------------------------------------------------------
# Math: the explained scalar, its embedding gradient, integrated gradients
# --------------------------------------------------------------------------------------


def explained_metric(logits_at_position: Float[Tensor, "batch vocab"], target: Int[Tensor, " batch"],
                     contrast: Int[Tensor, " batch"] | None) -> Float[Tensor, " batch"]:
    """``logit[target]`` or ``logit[target] − logit[contrast]`` per example."""
    value = logits_at_position.gather(-1, target[:, None])[:, 0]
    if contrast is not None:
        value = value - logits_at_position.gather(-1, contrast[:, None])[:, 0]
    return value


def gradient_times_delta(embeds: Float[Tensor, "batch pos d"], baseline: Float[Tensor, "batch pos d"],
                         grads: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch pos"]:
    """``Σ_d (e − e′)_d · g_d`` per position, in float32."""
    return ((embeds.float() - baseline.float()) * grads.float()).sum(-1)


def _forward_mask(mask: Bool[Tensor, "batch pos"]) -> Tensor | None:
    """The attention mask to pass to the model: None when nothing is padded (the plain code path)."""
    return None if bool(mask.all()) else mask.long()


def _logits_at(model, tokens, mask, cols) -> Float[Tensor, "batch vocab"]:
    logits = model(tokens, attention_mask=_forward_mask(mask))
    return logits[torch.arange(tokens.shape[0], device=tokens.device), cols].float()


def embedding_gradient(model, tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"],
                       cols: Int[Tensor, " batch"], target: Int[Tensor, " batch"] | None,
                       contrast: Int[Tensor, " batch"] | None, hook_set: GIMHookSet | None,
                       inject: Float[Tensor, "batch pos d"] | None = None, attached: bool = False):
    """One forward and one backward: the gradient of the explained scalar w.r.t. ``hook_embed``.

    The ``hook_embed`` activation (or ``inject``, if given) becomes a fresh leaf that requires grad,
    and ``torch.autograd.grad`` reads its gradient, so no parameter ``.grad`` is touched. With a
    ``hook_set`` (a non-plain GIM preset), GIM is attached during forward and backward, and
    ``verify()`` afterwards raises if a rule did not fire. ``attached=True``: ``hook_set`` is already on
    the model (see :func:`gim_tl.stacking.use_or_refuse`) and is used as it is, not attached again.

    Returns ``(embeds, grads, metric, target)``; ``target`` is the argmax at ``cols`` if None was given.
    """
    store: dict[str, Tensor] = {}

    def make_leaf(x, hook):
        value = x if inject is None else inject
        if value.shape != x.shape:
            raise ValueError(f"injected embeddings have shape {tuple(value.shape)}, hook_embed {tuple(x.shape)}")
        leaf = value.detach().to(x.dtype).requires_grad_(True)
        store["embed"] = leaf
        return leaf

    fwd_hooks = [("hook_embed", make_leaf)]
    if hook_set is not None:
        hook_set.reset_counts()
        if not attached:
            fwd_hooks = hook_set.fwd_hooks(model) + fwd_hooks
    with torch.enable_grad(), model.hooks(fwd_hooks=fwd_hooks):
        at = _logits_at(model, tokens, mask, cols)
        if "embed" not in store:
            raise RuntimeError("hook_embed did not fire: the model's forward does not pass through its embedding")
        if target is None:
            target = at.detach().argmax(-1)
        metric = explained_metric(at, target, contrast)
        (grads,) = torch.autograd.grad(metric.sum(), store["embed"])
    if hook_set is not None:
        hook_set.verify()
    return store["embed"].detach(), grads.detach(), metric.detach(), target


def riemann_alphas(steps: int) -> Float[Tensor, " steps"]:
    """Midpoint rule on [0, 1]: ``α_k = (k + ½) / steps``, each with weight ``1 / steps``."""
    return (torch.arange(steps, dtype=torch.float64) + 0.5) / steps


def integrated_gradients(model, tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"],
                         cols: Int[Tensor, " batch"], target: Int[Tensor, " batch"],
                         contrast: Int[Tensor, " batch"] | None, embeds: Float[Tensor, "batch pos d"],
                         baseline: Float[Tensor, "batch pos d"], steps: int, batch_size: int,
                         progress: bool) -> Float[Tensor, "batch pos d"]:
    """Path-averaged plain gradient along ``e′ + α (e − e′)``, midpoint Riemann sum over ``steps`` points.

    All (example, α) pairs are run in chunks of ``batch_size`` forward/backward passes.
    """
    n = tokens.shape[0]
    alphas = riemann_alphas(steps)
    pairs = [(i, k) for i in range(n) for k in range(steps)]
    chunks = [pairs[s:s + batch_size] for s in range(0, len(pairs), batch_size)]
    delta = embeds.double() - baseline.double()
    total = torch.zeros(embeds.shape, dtype=torch.float64, device=embeds.device)
    iterator = chunks
    if progress:
        from tqdm import tqdm

        iterator = tqdm(chunks, desc=f"integrated gradients ({steps} steps)", unit="batch", file=sys.stderr)
    for chunk in iterator:
        ex = torch.tensor([i for i, _ in chunk], device=tokens.device)
        alpha = alphas[[k for _, k in chunk]].to(embeds.device)
        path = (baseline.double()[ex] + alpha[:, None, None] * delta[ex]).to(embeds.dtype)
        _, grads, _, _ = embedding_gradient(model, tokens[ex], mask[ex], cols[ex], target[ex],
                                            None if contrast is None else contrast[ex], None, inject=path)
        total.index_add_(0, ex, grads.double())
    return (total / steps).to(torch.float32)


# --------------------------------------------------------------------------------------
# The public entry point
# --------------------------------------------------------------------------------------


def deprecated_progress(progress: bool | None, show_progress: bool | None, where: str,
                        default: bool | None = None) -> bool | None:
    """The ``progress`` value (``default`` if None), accepting the old ``show_progress`` with a DeprecationWarning."""
    if show_progress is None:
        return default if progress is None else progress
    warnings.warn(f"{where}(show_progress=...) is deprecated and will be removed in the next release; "
                  "use progress=...", DeprecationWarning, stacklevel=3)
    if progress is not None and bool(progress) != bool(show_progress):
        raise ValueError(f"{where}: progress={progress!r} and show_progress={show_progress!r} disagree; give progress")
    return show_progress


def attribute_tokens(
    model,
    prompts: Prompts,
    target: TokenSpec = None,
    *,
    method: str = "gim",
    baseline: BaselineSpec = "space",
    position: int = -1,
    contrast: TokenSpec = None,
    attention_mask: Tensor | None = None,
    prepend_bos: bool = False,
    ig_steps: int = 50,
    ig_keep_first: bool = True,
    ig_batch_size: int = 16,
    hook_set: GIMHookSet | None = None,
    progress: bool | None = None,
    show_progress: bool | None = None,
) -> TokenAttribution:
    """Attribute one logit (or logit difference) to the prompt's tokens.

    Args:
        model: a TL ``TransformerBridge`` or ``HookedTransformer`` (eval mode).
        prompts: a string, a list of strings (left-padded via :func:`gim_tl.models.tokens_for`), or
            token ids ``[batch, pos]`` / ``[pos]`` (then ``attention_mask`` marks real tokens, 1/True).
        target: the explained token: an id, a one-token string (``" Paris"``), one per example
            (list/tensor), or None for the model's argmax at ``position``.
        method: a GIM preset (``"gim"``, ``"tsg"``, ... see :data:`METHODS`), ``"grad_x_input"`` (plain
            autograd; ``"plain"`` is its deprecated old name) or ``"integrated_gradients"``.
        baseline: ``"space"`` (the space token's embedding everywhere, as in the GIM paper), ``"pad"``, ``"zero"``,
            or a tensor broadcastable to ``[batch, pos, d_model]``.
        position: which position's logit, counted over real tokens (−1: the last real token).
        contrast: optional second token (same forms as ``target``): explain ``logit[target] − logit[contrast]``.
        prepend_bos: put the tokenizer's BOS token before each string prompt.
        ig_steps: integrated-gradients path points (midpoint Riemann sum).
        ig_keep_first: keep each row's first real token at its real embedding along the IG path
            (its baseline is the input, so its score is 0). Interpolating position 0 breaks IG on models
            with massive first-token activations (an attention sink, |h| ≈ 2e4 on SmolLM2): the model's
            output spikes along the path and the sum does not converge. False gives the textbook path.
        ig_batch_size: path points per forward/backward pass.
        hook_set: None (as in :func:`~gim_tl.patching.atp` and :func:`~gim_tl.patching.eap`): the set of
            ``method``. A :class:`GIMHookSet`: its rules instead (gradient methods only; ``method`` left at
            its default); the result's ``method`` is then the set's preset name, or ``"custom"``.
        progress: tqdm bar over IG batches; default on when ``ig_steps × batch ≥ 256`` and stderr is a tty.
        show_progress: deprecated name of ``progress``.

    One GIM set at a time: if a GIM set is already on the model (``gim.add_to(model)``, or inside
    ``gim.attach(model)``) and it has the rules asked for, it is used as it is (its report/verify counts
    are reset, then checked after the backward) and the result's label says "(attached set)"; other
    rules, ``"grad_x_input"`` and ``"integrated_gradients"`` then raise
    :class:`~gim_tl.stacking.GIMStackingError` (they would silently get GIM gradients).

    Returns:
        A :class:`TokenAttribution` (scores on CPU in float32; 0 at padded positions).
    """
    progress = deprecated_progress(progress, show_progress, "attribute_tokens")
    if method == "integrated_gradients":
        if hook_set is not None:
            raise ValueError("integrated_gradients uses plain autograd; hook_set applies to the gradient methods only")
        run_set = None
    else:
        method, run_set = stacking.resolve_method(stacking.canonical_method(method, METHODS), hook_set)
    if method == "integrated_gradients" and (not isinstance(ig_steps, int) or ig_steps < 1 or ig_batch_size < 1):
        raise ValueError(f"ig_steps and ig_batch_size must be positive ints, got {ig_steps!r}, {ig_batch_size!r}")
    if getattr(model, "training", False):
        raise ValueError("the model is in training mode (dropout); call model.eval() first")
    stacking.refuse_meta(model)
    what = f"attribute_tokens(method={method!r})"
    run_set, attached = stacking.use_or_refuse(model, run_set, what)

    tokens, mask = prepare_tokens(model, prompts, attention_mask, prepend_bos)
    batch = tokens.shape[0]
    cols = resolve_positions(mask, position)
    target_ids = resolve_token_ids(model, target, batch, "target")
    contrast_ids = resolve_token_ids(model, contrast, batch, "contrast")

    if method == "integrated_gradients":
        embeds, _, metric, target_ids = embedding_gradient(model, tokens, mask, cols, target_ids, contrast_ids, None)
        base, base_name = baseline_embeddings(model, baseline, tokens, embeds)
        if ig_keep_first:
            first = mask.float().argmax(-1)
            rows = torch.arange(batch, device=tokens.device)
            base[rows, first] = embeds[rows, first]
        if progress is None:
            progress = ig_steps * batch >= _PROGRESS_MIN_POINTS and sys.stderr.isatty()
        grads = integrated_gradients(model, tokens, mask, cols, target_ids, contrast_ids, embeds, base,
                                     ig_steps, ig_batch_size, bool(progress))
        details = dict(ig_steps=ig_steps, ig_keep_first=ig_keep_first, ig_rule="midpoint")
    else:
        embeds, grads, metric, target_ids = embedding_gradient(model, tokens, mask, cols, target_ids, contrast_ids,
                                                               run_set, attached=attached)
        base, base_name = baseline_embeddings(model, baseline, tokens, embeds)
        details = {"attached_set": True} if attached else {}

    scores = gradient_times_delta(embeds, base, grads).masked_fill(~mask, 0.0)
    token_ids = tokens.cpu()
    return TokenAttribution(
        tokens=[_decode(model, row.tolist()) for row in token_ids],
        token_ids=token_ids, scores=scores.detach().cpu().float(), mask=mask.cpu(),
        target_ids=target_ids.cpu(), contrast_ids=None if contrast_ids is None else contrast_ids.cpu(),
        target_strs=_decode(model, target_ids.tolist()),
        contrast_strs=None if contrast_ids is None else _decode(model, contrast_ids.tolist()),
        position=cols.cpu(), method=method, metric_values=metric.cpu().float(), baseline=base_name, details=details)
