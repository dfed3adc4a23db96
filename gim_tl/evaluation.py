"""Faithfulness of token attributions: comprehensiveness, sufficiency, a random baseline, paired tests.

The metrics follow the GIM paper's evaluation protocol (``docs/evaluation.md`` explains each choice):

* the ranking sorts positions ``1 … n−2`` by attribution, descending (first and last token excluded);
  ``b`` is the space token, ``f`` the score of the explained target at the last position;
* **comprehensiveness**: for ``k = 1 … 50`` replace the top-``k`` ranked tokens by ``b`` (cumulatively),
  ``C_k = f(x) − f(x^(k))``; ``C_k = 0`` for ``k > n−2``; ``comp = (1/50) Σ_k C_k / f(x)``. Higher is better;
* **sufficiency**: for ``ρ ∈ {.5, .8, .9, .95, .99}`` replace the ``⌊ρ(n−2)⌋`` *lowest*-ranked tokens,
  ``S_ρ = f(x) − f(x^ρ)``; ``suff = (1/5) Σ_ρ S_ρ / f(x)``. Lower is better.

Scorings of ``f`` (all from the logits at the last position):

* ``"logit"``: the raw target logit (the paper). Normalized by ``f(x)``; examples with ``f(x) ≤ 0`` get
  NaN (dividing by a non-positive score is meaningless) and are counted in ``n_dropped``;
* ``"logit_diff"``: target logit minus contrast logit (Yes vs No, IOI answer vs distractor). Normalized and
  guarded like ``"logit"``: the metric is then the fraction of the decision margin removed;
* ``"logprob"``: the target log-probability. Log-probs are negative, so dividing by ``f(x)`` would flip
  signs; this scoring is **not normalized**: ``comp`` and ``suff`` are mean drops in log-prob, in nats.

``restrict_to`` (optional, per example and position) shrinks the eligible set to positions that are
also marked (e.g. only a review inside a few-shot chat prompt); ``n−2`` is then replaced by the number
``m`` of eligible positions everywhere, and non-eligible tokens are never replaced.

The model enters only through a callable ``tokens [batch, pos] -> logits`` (``[batch, pos, vocab]`` or
last-position ``[batch, vocab]``); :func:`last_logits_fn` builds a fast one from a TL model.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from gim_tl.attribution import deprecated_progress

Scoring = Literal["logit", "logprob", "logit_diff"]
LogitsFn = Callable[[Tensor], Tensor]

#: Sufficiency keep-fractions ρ of the paper.
RHOS: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.99)
#: Number of comprehensiveness steps k = 1 … N_STEPS of the paper.
N_STEPS = 50
#: Which scorings are divided by the clean score f(x).
NORMALIZED: dict[str, bool] = {"logit": True, "logit_diff": True, "logprob": False}
SCORINGS: tuple[str, ...] = tuple(NORMALIZED)


# ---------------------------------------------------------------------------------------------
# Model access
# ---------------------------------------------------------------------------------------------


def last_logits_fn(model) -> LogitsFn:
    """A no-grad callable ``tokens [batch, pos] -> last-position logits [batch, vocab]`` for ``model``.

    * TransformerBridge: its HF model with ``logits_to_keep=1`` (the bridge's logits are HF's);
    * HookedTransformer: run to the last block, then ``ln_final`` and ``unembed`` on the last position;
    * any other callable is used as is (a ``[batch, pos, vocab]`` output is cut to the last position).

    Skipping the unembedding at every other position saves time and ``batch × pos × vocab`` memory.
    """
    hf = getattr(model, "original_model", None)
    if hf is not None and hasattr(model, "hook_dict"):
        def bridge_fn(tokens: Tensor) -> Tensor:
            with torch.no_grad():
                return hf(input_ids=tokens, logits_to_keep=1).logits[:, -1]
        return bridge_fn
    if hasattr(model, "hook_dict") and hasattr(model, "unembed") and hasattr(model, "ln_final"):
        def hooked_fn(tokens: Tensor) -> Tensor:
            with torch.no_grad():
                resid = model(tokens, stop_at_layer=model.cfg.n_layers)
                logits = model.unembed(model.ln_final(resid[:, -1:]))[:, -1]
                cap = float(getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0)
                return cap * torch.tanh(logits / cap) if cap > 0 else logits
        return hooked_fn
    if not callable(model):
        raise TypeError(f"expected a TL model or a callable tokens -> logits, got {type(model).__name__}")

    def plain_fn(tokens: Tensor) -> Tensor:
        with torch.no_grad():
            out = model(tokens)
        out = getattr(out, "logits", out)
        return out[:, -1] if out.ndim == 3 else out
    return plain_fn


class PrefixCachedLogits:
    """``tokens [batch, pos] -> last-position logits`` that runs the batch's common prefix only once.

    The perturbed inputs of one example share every token before the earliest replaced position
    (all of a chat prompt's system turn and demonstrations when rankings are restricted to the final
    user text). The shared prefix is run once through the HF model with a KV cache, then every row
    runs only its own suffix against a copy of that cache. The last prefix cache is kept and reused
    (cropped) by later batches of the same example. Shorter prefixes than ``min_prefix`` run uncached.

    The cache is checked, never trusted: every prefix cache must hold exactly the prefix's length, and
    the first cached result is compared with an uncached run of the same row. If either check fails
    (some transformers/TransformerLens pairs hand back an empty cache from a bridge: transformers ≥ 5.24
    with TL 4.3, whose attention reads a keyword that transformers renamed), it warns once and runs
    uncached from then on, so the logits are always the uncached ones up to float rounding.
    """

    def __init__(self, model, min_prefix: int = 16):
        hf = getattr(model, "original_model", model)
        if not hasattr(hf, "config") or not callable(hf):
            raise TypeError("PrefixCachedLogits needs a TransformerBridge or an HF causal LM")
        self.hf, self.min_prefix = hf, min_prefix
        # transformers >= 5.24 calls the KV cache `cache` (argument and output); older releases `past_key_values`
        self._cache_name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
        self._tokens: Tensor | None = None
        self._past = None
        self._checked = False  # the first cached result was compared with an uncached run
        self.cache_ok = True  # False once a check failed: every later call runs uncached
        self.prefix_tokens_run = 0

    def uncached(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch vocab"]:
        """The reference path: the whole of every row, no cache."""
        with torch.no_grad():
            return self.hf(input_ids=tokens, logits_to_keep=1).logits[:, -1]

    def __call__(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch vocab"]:
        n = tokens.shape[1]
        same = (tokens == tokens[:1]).all(0).int()
        common = min(int(same.cumprod(0).sum()), n - 1)
        if not self.cache_ok or common < self.min_prefix:
            return self.uncached(tokens)
        with torch.no_grad():
            use = self._reusable(tokens[0], common)
            if use is None:
                self._tokens = tokens[0, :common].clone()
                self._past = getattr(self.hf(input_ids=self._tokens[None], use_cache=True), self._cache_name)
                self.prefix_tokens_run += common
                use = common
            held = 0 if self._past is None else self._past.get_seq_length()
            if held != self._tokens.numel():
                return self._give_up(tokens, f"the prefix cache holds {held} positions, not the prefix's "
                                             f"{self._tokens.numel()}")
            past = copy.deepcopy(self._past)
            if use < held:
                past.crop(use - held)  # negative: drop that many (transformers 4.x and 5.x)
            past.batch_repeat_interleave(tokens.shape[0])
            out = self.hf(input_ids=tokens[:, use:], use_cache=True, logits_to_keep=1, **{self._cache_name: past})
            logits = out.logits[:, -1]
        if not self._checked:
            reference = self.uncached(tokens[:1])
            scale = 1e-4 if logits.dtype == torch.float32 else 2e-2
            if not torch.allclose(logits[:1].float(), reference.float(), rtol=scale, atol=scale):
                gap = (logits[:1].float() - reference.float()).abs().max().item()
                return self._give_up(tokens, f"the first cached logits differ from an uncached run by {gap:.3g}")
            self._checked = True
        return logits

    def parameters(self):
        return self.hf.parameters()

    def _give_up(self, tokens: Tensor, why: str) -> Tensor:
        """Warn once, stop caching, and answer this call uncached."""
        self.cache_ok, self._past, self._tokens = False, None, None
        warnings.warn(f"PrefixCachedLogits: {why}; this model's KV cache cannot be trusted, so every call now runs "
                      "uncached (same logits, slower). With TransformerLens 4.3 bridges this happens on "
                      "transformers >= 5.24; the project's locked versions cache correctly.",
                      RuntimeWarning, stacklevel=3)
        return self.uncached(tokens)

    def _reusable(self, row: Tensor, common: int) -> int | None:
        """How much of the stored prefix fits ``row`` (None: recompute). A stored prefix shorter than
        ``common`` is still used if it covers at least half of it."""
        if self._tokens is None:
            return None
        k = min(common, self._tokens.numel())
        if not torch.equal(self._tokens[:k].to(row.device), row[:k]):
            return None
        return k if k == common or 2 * k >= common else None


def space_token_id(tokenizer) -> int:
    """The id of ``" "`` (the paper's replacement token); raises if it is not a single token."""
    ids = tokenizer(" ", add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"' ' tokenizes to {ids}, not one token; pass baseline_id=... explicitly")
    return int(ids[0])


# ---------------------------------------------------------------------------------------------
# Pure pieces: rankings, replacement sets, aggregation
# ---------------------------------------------------------------------------------------------


def eligible_positions(n: int, restrict: Bool[Tensor, " n"] | None = None) -> Bool[Tensor, " n"]:
    """Positions ``1 … n−2`` (first and last excluded), intersected with ``restrict`` if given."""
    ok = torch.zeros(n, dtype=torch.bool)
    if n > 2:
        ok[1:n - 1] = True
    if restrict is not None:
        ok &= restrict.bool().cpu()
    return ok


def ranking(scores: Float[Tensor, " n"], eligible: Bool[Tensor, " n"]) -> Int[Tensor, " m"]:
    """Eligible positions sorted by attribution, highest first (ties keep position order)."""
    idx = torch.nonzero(eligible, as_tuple=False).flatten()
    s = scores.detach().cpu().double()[idx]
    if torch.isnan(s).any():
        raise ValueError("attribution scores contain NaN at eligible positions; fix the attribution first")
    return idx[torch.argsort(s, descending=True, stable=True)]


def n_replaced(rho: float, m: int) -> int:
    """``⌊ρ·m⌋`` (the 1e-9 guards against ``0.95·20 = 18.999…`` in floating point)."""
    return int(math.floor(rho * m + 1e-9))


def replacement_sets(order: Int[Tensor, " m"], n_steps: int = N_STEPS,
                     rhos: Sequence[float] = RHOS) -> tuple[list[Tensor], list[Tensor]]:
    """Positions to replace: comprehensiveness ``order[:k]`` for ``k = 1 … min(n_steps, m)``, and
    sufficiency the ``⌊ρ·m⌋`` lowest-ranked positions for each ``ρ``."""
    m = int(order.numel())
    comp = [order[:k] for k in range(1, min(n_steps, m) + 1)]
    suff = [order[m - n_replaced(rho, m):] for rho in rhos]
    return comp, suff


def perturb(tokens: Int[Tensor, " n"], positions: Sequence[Tensor], baseline_id: int) -> Int[Tensor, "s n"]:
    """One copy of ``tokens`` per entry of ``positions``, with those positions set to ``baseline_id``."""
    out = tokens.reshape(1, -1).repeat(len(positions), 1)
    for row, pos in enumerate(positions):
        out[row, pos] = baseline_id
    return out


def aggregate(clean: float, comp_scores: Float[Tensor, " k"], suff_scores: Float[Tensor, " r"], *,
              n_steps: int = N_STEPS, normalize: bool = True) -> tuple[float, float, Tensor, Tensor]:
    """``(comp, suff, C curve [n_steps], S curve [r])`` from the scores of the perturbed inputs.

    ``comp_scores`` holds ``f(x^(k))`` for ``k = 1 … len`` (missing steps count as ``C_k = 0``).
    With ``normalize`` the drops are divided by ``clean``; if ``clean ≤ 0`` everything is NaN.
    """
    c_curve = torch.zeros(n_steps, dtype=torch.float64)
    c_curve[: comp_scores.numel()] = clean - comp_scores.double()
    s_curve = clean - suff_scores.double()
    if normalize:
        if not clean > 0:
            return math.nan, math.nan, torch.full_like(c_curve, math.nan), torch.full_like(s_curve, math.nan)
        c_curve, s_curve = c_curve / clean, s_curve / clean
    return float(c_curve.sum() / n_steps), float(s_curve.mean()), c_curve, s_curve


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@dataclass
class FaithfulnessResult:
    """Comprehensiveness and sufficiency of one method under one scoring, per example.

    ``comprehensiveness`` / ``sufficiency`` / ``clean``: ``[batch]`` (NaN where dropped);
    ``comp_curve``: ``[batch, n_steps]`` (``C_k``, normalized if ``normalized``); ``suff_curve``:
    ``[batch, len(rhos)]``; ``n_eligible``: ``[batch]`` ranked positions ``m``.
    """

    scoring: str
    normalized: bool
    comprehensiveness: Float[Tensor, " batch"]
    sufficiency: Float[Tensor, " batch"]
    clean: Float[Tensor, " batch"]
    comp_curve: Float[Tensor, "batch k"]
    suff_curve: Float[Tensor, "batch rho"]
    n_eligible: Int[Tensor, " batch"]

    @property
    def n_dropped(self) -> int:
        """Examples without a value (``f(x) ≤ 0`` for a normalized scoring)."""
        return int(torch.isnan(self.comprehensiveness).sum())

    def __len__(self) -> int:
        return int(self.comprehensiveness.numel())


def _readout(logits: Float[Tensor, "batch vocab"], target: int, contrast: int | None) -> Float[Tensor, "batch 3"]:
    """Per sequence: target logit, logsumexp of the logits, contrast logit (NaN without contrast)."""
    logits = logits.double()
    t = logits[:, target]
    c = logits[:, contrast] if contrast is not None else torch.full_like(t, math.nan)
    return torch.stack([t, torch.logsumexp(logits, -1), c], dim=-1).cpu()


def score_from_readout(readout: Float[Tensor, "... 3"], scoring: str) -> Tensor:
    """The scalar ``f`` of a scoring from :func:`_readout` values."""
    t, lse, c = readout.unbind(-1)
    if scoring == "logit":
        return t
    if scoring == "logprob":
        return t - lse
    if scoring == "logit_diff":
        return t - c
    raise ValueError(f"unknown scoring {scoring!r}; choose from {SCORINGS}")


def _key(seq: Tensor, target: int, contrast: int | None) -> bytes:
    return hashlib.sha1(seq.cpu().numpy().tobytes() + f"|{target}|{contrast}".encode()).digest()


def _run(logits_fn: LogitsFn, seqs: Tensor, target: int, contrast: int | None, batch_size: int,
         cache: dict | None, device) -> Float[Tensor, "s 3"]:
    """Readouts of every row of ``seqs``, forwarding only rows that are not cached (and each once)."""
    keys = [_key(s, target, contrast) for s in seqs]
    todo: dict[bytes, int] = {}
    for i, k in enumerate(keys):
        if (cache is None or k not in cache) and k not in todo:
            todo[k] = i
    found: dict[bytes, Tensor] = {}
    rows = list(todo.items())
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = seqs[[i for _, i in chunk]].to(device)
        out = _readout(logits_fn(batch), target, contrast)
        for (k, _), r in zip(chunk, out, strict=True):
            found[k] = r
    if cache is not None:
        cache.update(found)
    return torch.stack([found[k] if k in found else cache[k] for k in keys])


def _as_list(x, batch: int, name: str) -> list:
    if x is None:
        return [None] * batch
    out = x.tolist() if isinstance(x, Tensor) else list(x)
    if len(out) != batch:
        raise ValueError(f"{name} has {len(out)} entries for {batch} examples")
    return [None if v is None else int(v) for v in out]


def evaluate_faithfulness(
    model,
    tokens: Int[Tensor, "batch pos"],
    scores: Float[Tensor, "batch pos"],
    target_ids: Int[Tensor, " batch"] | Sequence[int],
    *,
    baseline_id: int,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    contrast_ids: Int[Tensor, " batch"] | Sequence[int] | None = None,
    scorings: Sequence[str] | None = None,
    restrict_to: Bool[Tensor, "batch pos"] | None = None,
    n_steps: int = N_STEPS,
    rhos: Sequence[float] = RHOS,
    batch_size: int = 16,
    cache: dict | None = None,
    progress: bool | None = None,
    desc: str = "faithfulness",
    show_progress: bool | None = None,
) -> dict[str, FaithfulnessResult]:
    """Comprehensiveness and sufficiency of ``scores`` for each example, under each scoring.

    Args:
        model: a TL model or a callable ``tokens -> logits`` (see :func:`last_logits_fn`).
        tokens, attention_mask: the explained inputs; padded positions (mask 0, any side) are dropped, so
            every example is evaluated unpadded; ``f`` is read at its last real token.
        scores: attributions aligned with ``tokens``.
        target_ids / contrast_ids: explained token and (for ``"logit_diff"``) the contrast token per example.
        baseline_id: replacement token (the paper: the space token, :func:`space_token_id`).
        scorings: default ``("logit", "logprob")`` plus ``"logit_diff"`` when ``contrast_ids`` is given.
        restrict_to: optional per-position mask of rankable positions (see module docstring).
        batch_size: perturbed sequences per forward (an example needs at most ``n_steps + len(rhos) + 1``).
        cache: optional dict reused across calls: identical perturbed inputs (e.g. two methods with the
            same top-k set) are forwarded once.

    Returns:
        ``{scoring: FaithfulnessResult}``; normalized scorings hold NaN for examples with ``f(x) ≤ 0``
        (count: ``result.n_dropped``).
    """
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens, scores = tokens[None], torch.as_tensor(scores)[None]
        restrict_to = None if restrict_to is None else torch.as_tensor(restrict_to)[None]
    batch = tokens.shape[0]
    if scores.shape != tokens.shape:
        raise ValueError(f"scores {tuple(scores.shape)} must have the shape of tokens {tuple(tokens.shape)}")
    targets = _as_list(target_ids, batch, "target_ids")
    contrasts = _as_list(contrast_ids, batch, "contrast_ids")
    if scorings is None:
        scorings = ("logit", "logprob") + (("logit_diff",) if contrast_ids is not None else ())
    for s in scorings:
        if s not in NORMALIZED:
            raise ValueError(f"unknown scoring {s!r}; choose from {SCORINGS}")
        if s == "logit_diff" and contrast_ids is None:
            raise ValueError("scoring 'logit_diff' needs contrast_ids (e.g. the 'No' token or the IOI distractor)")
    mask = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    logits_fn = last_logits_fn(model)
    device = _device_of(model)

    per = {s: {"comp": [], "suff": [], "clean": [], "cc": [], "sc": []} for s in scorings}
    n_elig = []
    iterator = range(batch)
    if deprecated_progress(progress, show_progress, "evaluate_faithfulness", default=True):
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=desc, leave=False)
    for b in iterator:
        keep = mask[b].cpu()
        seq = tokens[b].cpu()[keep]
        restrict = None if restrict_to is None else restrict_to[b].cpu()[keep]
        order = ranking(scores[b].cpu()[keep], eligible_positions(seq.numel(), restrict))
        comp_sets, suff_sets = replacement_sets(order, n_steps, rhos)
        seqs = perturb(seq, [order[:0]] + comp_sets + suff_sets, baseline_id)
        read = _run(logits_fn, seqs, targets[b], contrasts[b], batch_size, cache, device)
        n_elig.append(int(order.numel()))
        for s in scorings:
            vals = score_from_readout(read, s)
            clean = float(vals[0])
            comp, suff, cc, sc = aggregate(clean, vals[1:1 + len(comp_sets)], vals[1 + len(comp_sets):],
                                           n_steps=n_steps, normalize=NORMALIZED[s])
            for name, v in (("comp", comp), ("suff", suff), ("clean", clean), ("cc", cc), ("sc", sc)):
                per[s][name].append(v)
    return {s: FaithfulnessResult(
        scoring=s, normalized=NORMALIZED[s],
        comprehensiveness=torch.tensor(per[s]["comp"], dtype=torch.float64),
        sufficiency=torch.tensor(per[s]["suff"], dtype=torch.float64),
        clean=torch.tensor(per[s]["clean"], dtype=torch.float64),
        comp_curve=torch.stack(per[s]["cc"]) if batch else torch.zeros(0, n_steps),
        suff_curve=torch.stack(per[s]["sc"]) if batch else torch.zeros(0, len(rhos)),
        n_eligible=torch.tensor(n_elig, dtype=torch.long),
    ) for s in scorings}


def evaluate_attribution(model, attribution, *, baseline_id: int, contrast_ids=None, **kwargs
                         ) -> dict[str, FaithfulnessResult]:
    """:func:`evaluate_faithfulness` of a :class:`~gim_tl.attribution.TokenAttribution` from
    :func:`gim_tl.attribution.attribute_tokens`: its tokens, mask, scores and targets, and its contrast tokens
    unless ``contrast_ids`` is given (so a logit-difference attribution is also scored by ``"logit_diff"``).

    The metrics read the model's output at each example's last real token, so the attribution must explain
    that position (``position=-1``, the default of ``attribute_tokens``); any other raises ``ValueError``.
    """
    mask = attribution.mask.bool()
    last = torch.stack([row.nonzero()[-1, 0] if row.any() else torch.tensor(-1) for row in mask])
    off = (attribution.position.cpu() != last).nonzero().flatten().tolist()
    if off:
        raise ValueError(
            f"examples {off} explain a position other than their last real token, but comprehensiveness and "
            "sufficiency read the model's output at the last token. Attribute with position=-1 on prompts cut "
            "to end at the explained token.")
    if contrast_ids is None:
        contrast_ids = attribution.contrast_ids
    return evaluate_faithfulness(model, attribution.token_ids, attribution.scores, attribution.target_ids,
                                 attention_mask=attribution.mask, baseline_id=baseline_id,
                                 contrast_ids=contrast_ids, **kwargs)


def random_scores(mask: Tensor, generator: torch.Generator) -> Float[Tensor, "batch pos"]:
    """Uniform random attributions with the shape of ``mask`` (a random ranking of every example)."""
    return torch.rand(mask.shape, generator=generator, dtype=torch.float64)


def random_baseline(model, tokens: Int[Tensor, "batch pos"], target_ids, *, baseline_id: int,
                    n_permutations: int = 3, seed: int = 0, attention_mask=None, desc: str = "random",
                    **kwargs) -> dict[str, FaithfulnessResult]:
    """The metrics of random rankings: per example, the mean over ``n_permutations`` seeded permutations.

    Takes the keyword arguments of :func:`evaluate_faithfulness` (``contrast_ids``, ``restrict_to``, ...).
    """
    if n_permutations < 1:
        raise ValueError("n_permutations must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
    runs = [evaluate_faithfulness(model, tokens, random_scores(mask, gen), target_ids, baseline_id=baseline_id,
                                  attention_mask=attention_mask, desc=f"{desc} {i + 1}/{n_permutations}", **kwargs)
            for i in range(n_permutations)]
    out = {}
    for s, first in runs[0].items():
        mean = {attr: torch.stack([getattr(r[s], attr) for r in runs]).mean(0)
                for attr in ("comprehensiveness", "sufficiency", "comp_curve", "suff_curve")}
        out[s] = FaithfulnessResult(scoring=s, normalized=first.normalized, clean=first.clean,
                                    n_eligible=first.n_eligible, **mean)
    return out


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeanCI:
    """Mean with a two-sided t confidence interval over ``n`` non-NaN values."""

    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def scipy_stats():
    """``scipy.stats``, imported on first use: only the statistics need it, not the metrics or GIM itself."""
    try:
        from scipy import stats
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "gim_tl's statistics (confidence intervals, sign tests, Spearman correlations) need scipy: "
            "pip install 'gim_tl[evaluation]'  (or: pip install scipy)"
        ) from err
    return stats


def t_quantile(p: float, df: int) -> float:
    """Quantile ``p`` of Student's t with ``df ≥ 1`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    return float(scipy_stats().t.ppf(p, df))


def mean_ci(values: Tensor | Sequence[float], level: float = 0.95) -> MeanCI:
    """Mean and ``level`` t-interval ``mean ± t_{n−1} · s / √n`` over the non-NaN values."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    x = x[~torch.isnan(x)]
    n = int(x.numel())
    if n == 0:
        return MeanCI(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n == 1:
        return MeanCI(mean, math.nan, math.nan, 1)
    half = t_quantile(0.5 + level / 2, n - 1) * float(x.std(unbiased=True)) / math.sqrt(n)
    return MeanCI(mean, mean - half, mean + half, n)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test p-value of ``wins`` against ``losses`` (ties already removed): the binomial
    test of ``wins`` successes in ``wins + losses`` trials at ``p = ½``; 1 when there are no trials."""
    if wins < 0 or losses < 0:
        raise ValueError(f"wins and losses must be >= 0, got {wins} and {losses}")
    n = wins + losses
    return 1.0 if n == 0 else float(scipy_stats().binomtest(wins, n, 0.5, alternative="two-sided").pvalue)


@dataclass(frozen=True)
class PairedComparison:
    """Method A against method B on the same examples.

    ``win_rate = (wins + ½ ties) / n`` (0.5 = no difference); ``p_value``: two-sided exact sign test
    on wins vs losses (ties dropped).
    """

    wins: int
    losses: int
    ties: int
    win_rate: float
    p_value: float

    @property
    def n(self) -> int:
        return self.wins + self.losses + self.ties


def paired_comparison(a: Tensor | Sequence[float], b: Tensor | Sequence[float], *, higher_is_better: bool,
                      tie_tol: float = 1e-9) -> PairedComparison:
    """Per-example wins of ``a`` over ``b`` (pairs with a NaN are dropped; ``|a − b| ≤ tie_tol`` is a tie).

    Use ``higher_is_better=True`` for comprehensiveness and ``False`` for sufficiency.
    """
    a = torch.as_tensor(a, dtype=torch.float64).flatten()
    b = torch.as_tensor(b, dtype=torch.float64).flatten()
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal lengths, got {a.numel()} and {b.numel()}")
    ok = ~(torch.isnan(a) | torch.isnan(b))
    diff = (a - b)[ok] * (1 if higher_is_better else -1)
    wins = int((diff > tie_tol).sum())
    losses = int((diff < -tie_tol).sum())
    ties = int(diff.numel()) - wins - losses
    n = wins + losses + ties
    return PairedComparison(wins, losses, ties, (wins + 0.5 * ties) / n if n else math.nan, sign_test(wins, losses))


def summarize_results(results: Mapping[str, FaithfulnessResult], reference: str | None = None,
                      level: float = 0.95) -> list[dict]:
    """One row per method: mean ± CI of comp and suff, dropped count, and (if ``reference`` is one of the
    methods) paired win rates and sign-test p-values against it."""
    rows = []
    ref = results.get(reference) if reference is not None else None
    for name, r in results.items():
        comp, suff = mean_ci(r.comprehensiveness, level), mean_ci(r.sufficiency, level)
        row = {"method": name, "scoring": r.scoring, "n": comp.n, "dropped": r.n_dropped,
               "comp": comp.mean, "comp_low": comp.low, "comp_high": comp.high,
               "suff": suff.mean, "suff_low": suff.low, "suff_high": suff.high}
        if ref is not None and name != reference:
            pc = paired_comparison(r.comprehensiveness, ref.comprehensiveness, higher_is_better=True)
            ps = paired_comparison(r.sufficiency, ref.sufficiency, higher_is_better=False)
            row.update(comp_win=pc.win_rate, comp_p=pc.p_value, suff_win=ps.win_rate, suff_p=ps.p_value)
        rows.append(row)
    return rows
