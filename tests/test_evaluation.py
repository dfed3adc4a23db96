"""Faithfulness metrics on a stub model whose target logit is a known sum over the tokens present; and
evaluate_attribution on a tiny model."""

from __future__ import annotations

import math
import sys
import warnings

import pytest
import torch

from gim_tl import evaluation as ev

SPACE = 0
TARGET, CONTRAST = 1, 2
VOCAB = 12
# Weight each token adds to the target logit (space and the two answer tokens add nothing).
WEIGHTS = torch.tensor([0.0, 0.0, 0.0, 3.0, 1.0, 2.0, 0.5, 10.0, 4.0, 0.25, 1.5, 0.75], dtype=torch.float64)
#: first (excluded, w=10), then w = 3, 1, 2, 0.5 at positions 1..4, last (excluded, w=4)
TOKENS = torch.tensor([7, 3, 4, 5, 6, 8])


class LinearStub:
    """``tokens -> logits [batch, pos, vocab]``: target logit ``bias + Σ_i w[token_i]``, contrast logit
    ``contrast``, every other logit 0. Counts the sequences it is asked to score."""

    def __init__(self, bias: float = 1.0, contrast: float = 2.0):
        self.bias, self.contrast, self.calls = bias, contrast, 0

    def target_logit(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.bias + WEIGHTS[tokens].sum(-1)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += tokens.shape[0]
        out = torch.zeros(*tokens.shape, VOCAB, dtype=torch.float64)
        out[:, -1, TARGET] = self.target_logit(tokens)
        out[:, -1, CONTRAST] = self.contrast
        return out


def reference_comp_suff(weights_in_rank_order: list[float], clean: float, n_steps: int = 50):
    """Independent reference for the stub: replacing a token lowers f by its weight."""
    m = len(weights_in_rank_order)
    drops = [sum(weights_in_rank_order[:k]) for k in range(1, min(n_steps, m) + 1)]
    comp = sum(drops) / n_steps / clean
    suff_terms = []
    for rho in ev.RHOS:
        r = math.floor(rho * m + 1e-9)
        suff_terms.append(sum(weights_in_rank_order[m - r:]) if r else 0.0)
    return comp, sum(suff_terms) / len(suff_terms) / clean


def run(scores, *, stub=None, tokens=TOKENS, **kw):
    stub = stub or LinearStub()
    res = ev.evaluate_faithfulness(stub, tokens[None], torch.as_tensor(scores, dtype=torch.float64)[None],
                                   [TARGET], baseline_id=SPACE, progress=False, **kw)
    return res, stub


def test_perfect_ranking_matches_hand_values():
    true_w = WEIGHTS[TOKENS]
    res, _ = run(true_w)
    clean = 1 + float(true_w.sum())  # 21.5
    # Ranking by the true weights: 3, 2, 1, 0.5 (positions 1, 3, 2, 4).
    comp, suff = reference_comp_suff([3.0, 2.0, 1.0, 0.5], clean)
    assert res["logit"].clean.item() == pytest.approx(clean)
    assert res["logit"].comprehensiveness.item() == pytest.approx(comp)
    assert res["logit"].sufficiency.item() == pytest.approx(suff)
    # By hand: C = 3, 5, 6, 6.5 then zeros; S_rho = 1.5 (2 lowest), then 3.5 for the other four rhos.
    assert comp == pytest.approx((3 + 5 + 6 + 6.5) / 50 / 21.5)
    assert suff == pytest.approx((1.5 + 4 * 3.5) / 5 / 21.5)


def test_reversed_ranking_is_worse_on_both_metrics():
    true_w = WEIGHTS[TOKENS]
    good, _ = run(true_w)
    bad, _ = run(-true_w)
    comp, suff = reference_comp_suff([0.5, 1.0, 2.0, 3.0], 21.5)
    assert bad["logit"].comprehensiveness.item() == pytest.approx(comp)
    assert bad["logit"].sufficiency.item() == pytest.approx(suff)
    assert bad["logit"].comprehensiveness.item() < good["logit"].comprehensiveness.item()
    assert bad["logit"].sufficiency.item() > good["logit"].sufficiency.item()


def test_first_and_last_token_never_ranked_and_steps_beyond_m_are_zero():
    # Huge scores on the excluded first/last tokens must not matter.
    true_w = WEIGHTS[TOKENS].clone()
    scores = true_w.clone()
    scores[0], scores[-1] = 1e6, 1e6
    res, _ = run(scores)
    base, _ = run(true_w)
    assert res["logit"].comprehensiveness.item() == pytest.approx(base["logit"].comprehensiveness.item())
    curve = res["logit"].comp_curve[0]
    assert curve.shape == (50,)
    assert res["logit"].n_eligible.item() == 4
    assert torch.all(curve[4:] == 0) and torch.all(curve[:4] > 0)


def test_rho_floors():
    assert [ev.n_replaced(r, 20) for r in ev.RHOS] == [10, 16, 18, 19, 19]
    assert [ev.n_replaced(r, 10) for r in ev.RHOS] == [5, 8, 9, 9, 9]
    assert [ev.n_replaced(r, 3) for r in ev.RHOS] == [1, 2, 2, 2, 2]
    assert ev.n_replaced(0.99, 100) == 99
    order = torch.arange(1, 11)  # m = 10, ranked 1..10
    _, suff = ev.replacement_sets(order)
    assert [s.tolist() for s in suff][0] == [6, 7, 8, 9, 10]  # the 5 lowest-ranked
    assert all(len(s) == n for s, n in zip(suff, [5, 8, 9, 9, 9], strict=True))


def test_long_input_uses_exactly_50_steps():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, VOCAB, (70,), generator=g)
    w = WEIGHTS[tokens]
    res, stub = run(w, tokens=tokens)
    ranked = sorted(w[1:-1].tolist(), reverse=True)
    comp, suff = reference_comp_suff(ranked, 1 + float(w.sum()))
    assert res["logit"].comprehensiveness.item() == pytest.approx(comp)
    assert res["logit"].sufficiency.item() == pytest.approx(suff)
    assert stub.calls <= 1 + 50 + 5  # clean + 50 steps + 5 rhos, duplicates forwarded once


def test_nonpositive_clean_logit_is_dropped_but_logprob_is_not():
    res, _ = run(WEIGHTS[TOKENS], stub=LinearStub(bias=-100.0))
    assert math.isnan(res["logit"].comprehensiveness.item()) and res["logit"].n_dropped == 1
    assert math.isnan(res["logit"].sufficiency.item())
    assert not math.isnan(res["logprob"].comprehensiveness.item()) and res["logprob"].n_dropped == 0


def test_logprob_and_logit_diff_scorings():
    stub = LinearStub(contrast=2.0)
    w = WEIGHTS[TOKENS]
    res = ev.evaluate_faithfulness(stub, TOKENS[None], w[None], [TARGET], contrast_ids=[CONTRAST],
                                   baseline_id=SPACE, progress=False)
    assert set(res) == {"logit", "logprob", "logit_diff"}
    # logit_diff = target - 2: the same drops, divided by (21.5 - 2).
    comp, suff = reference_comp_suff([3.0, 2.0, 1.0, 0.5], 21.5 - 2.0)
    assert res["logit_diff"].comprehensiveness.item() == pytest.approx(comp)
    assert res["logit_diff"].sufficiency.item() == pytest.approx(suff)
    # logprob: unnormalized mean drop of log p(target); recompute it from the stub's logits directly.
    def logp(seq):
        return torch.log_softmax(stub(seq[None])[0, -1], -1)[TARGET].item()
    clean = logp(TOKENS)
    drops = []
    for k in range(1, 5):
        seq = TOKENS.clone()
        seq[[1, 3, 2, 4][:k]] = SPACE
        drops.append(clean - logp(seq))
    assert res["logprob"].comprehensiveness.item() == pytest.approx(sum(drops) / 50)
    assert not res["logprob"].normalized and res["logit"].normalized


def test_logit_diff_needs_contrast():
    with pytest.raises(ValueError, match="contrast"):
        run(WEIGHTS[TOKENS], scorings=("logit_diff",))


def test_left_padding_and_batching_give_per_example_results():
    w = WEIGHTS[TOKENS]
    short = torch.tensor([7, 5, 3, 8])
    tokens = torch.stack([TOKENS, torch.cat([torch.full((2,), 11), short])])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    scores = torch.stack([w, torch.cat([torch.tensor([99.0, 99.0]), WEIGHTS[short]])])
    res = ev.evaluate_faithfulness(LinearStub(), tokens, scores, [TARGET, TARGET], attention_mask=mask,
                                   baseline_id=SPACE, progress=False, batch_size=3)
    alone, _ = run(WEIGHTS[short], tokens=short)
    first, _ = run(w)
    assert res["logit"].comprehensiveness[1].item() == pytest.approx(alone["logit"].comprehensiveness.item())
    assert res["logit"].comprehensiveness[0].item() == pytest.approx(first["logit"].comprehensiveness.item())
    assert res["logit"].n_eligible.tolist() == [4, 2]


def test_restrict_to_ranks_only_marked_positions():
    w = WEIGHTS[TOKENS]
    restrict = torch.tensor([False, False, True, True, True, False])  # positions 2, 3, 4: w = 1, 2, 0.5
    res, _ = run(w, restrict_to=restrict[None])
    comp, suff = reference_comp_suff([2.0, 1.0, 0.5], 21.5)
    assert res["logit"].n_eligible.item() == 3
    assert res["logit"].comprehensiveness.item() == pytest.approx(comp)
    assert res["logit"].sufficiency.item() == pytest.approx(suff)


def test_cache_skips_repeated_inputs():
    cache: dict = {}
    stub = LinearStub()
    w = WEIGHTS[TOKENS]
    a, _ = run(w, stub=stub, cache=cache)
    first = stub.calls
    b, _ = run(w, stub=stub, cache=cache)
    assert first > 0 and stub.calls == first
    assert a["logit"].comprehensiveness.item() == b["logit"].comprehensiveness.item()


def test_random_baseline_lies_between_reversed_and_perfect():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, VOCAB, (30,), generator=g)
    w = WEIGHTS[tokens]
    best, _ = run(w, tokens=tokens)
    worst, _ = run(-w, tokens=tokens)
    rand = ev.random_baseline(LinearStub(), tokens[None], [TARGET], baseline_id=SPACE, n_permutations=20,
                              seed=0, progress=False)
    for s in ("logit", "logprob"):
        assert worst[s].comprehensiveness.item() < rand[s].comprehensiveness.item() < best[s].comprehensiveness.item()
        assert best[s].sufficiency.item() < rand[s].sufficiency.item() < worst[s].sufficiency.item()
    again = ev.random_baseline(LinearStub(), tokens[None], [TARGET], baseline_id=SPACE, n_permutations=20,
                               seed=0, progress=False)
    assert again["logit"].comprehensiveness.item() == rand["logit"].comprehensiveness.item()


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("wins", "losses", "expected"), [
    (8, 2, 2 * (1 + 10 + 45) / 2**10),   # 2 * P(X <= 2), X ~ Bin(10, 1/2), binomial coefficients by hand
    (2, 8, 2 * (1 + 10 + 45) / 2**10),   # symmetric in wins and losses
    (10, 0, 2 / 2**10),
    (5, 5, 1.0),
    (3, 9, 2 * (1 + 12 + 66 + 220) / 2**12),
    (1, 0, 1.0),                          # 2 * P(X <= 0 | n = 1) = 1
    (0, 0, 1.0),                          # no trials: no evidence
])
def test_sign_test_against_hand_binomials(wins, losses, expected):
    assert ev.sign_test(wins, losses) == pytest.approx(expected, rel=1e-12)


def test_sign_test_refuses_negative_counts():
    with pytest.raises(ValueError, match="must be >= 0"):
        ev.sign_test(-1, 3)


def test_statistics_without_scipy_name_the_extra(monkeypatch):
    """scipy is imported lazily; without it the error says which extra to install."""
    monkeypatch.setitem(sys.modules, "scipy", None)  # makes `from scipy import stats` raise ImportError
    with pytest.raises(ImportError, match=r"gim_tl\[evaluation\]"):
        ev.sign_test(3, 1)


def test_paired_comparison_counts_and_direction():
    a = torch.tensor([0.5, 0.4, 0.3, 0.3, float("nan")])
    b = torch.tensor([0.1, 0.5, 0.2, 0.3, 0.0])
    pc = ev.paired_comparison(a, b, higher_is_better=True)
    assert (pc.wins, pc.losses, pc.ties) == (2, 1, 1)
    assert pc.win_rate == pytest.approx(2.5 / 4)
    assert pc.p_value == pytest.approx(1.0)  # 2 * P(X <= 1 | n=3) = 2 * 4/8
    ps = ev.paired_comparison(a, b, higher_is_better=False)
    assert (ps.wins, ps.losses) == (1, 2)


def test_t_quantile_and_mean_ci():
    # Student-t table (e.g. Abramowitz & Stegun 26.10): t_{0.975, df}; df = 1 is tan(0.475 π) = 12.7062
    for df, table in ((1, math.tan(0.475 * math.pi)), (4, 2.7764), (9, 2.2622), (29, 2.0452)):
        assert ev.t_quantile(0.975, df) == pytest.approx(table, abs=1e-4)
    assert ev.t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-12)  # the median of a symmetric law
    assert ev.t_quantile(0.995, 10) == pytest.approx(3.1693, abs=1e-4)
    with pytest.raises(ValueError, match="df must be >= 1"):
        ev.t_quantile(0.975, 0)
    ci = ev.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0, float("nan")])
    half = 2.7764 * math.sqrt(2.5) / math.sqrt(5)
    assert ci.n == 5 and ci.mean == pytest.approx(3.0)
    assert ci.low == pytest.approx(3 - half, abs=1e-3) and ci.high == pytest.approx(3 + half, abs=1e-3)


def test_summarize_results_rows():
    w = WEIGHTS[TOKENS]
    res = {"good": run(w)[0]["logit"], "bad": run(-w)[0]["logit"]}
    rows = ev.summarize_results(res, reference="bad")
    good = next(r for r in rows if r["method"] == "good")
    assert good["comp_win"] == 1.0 and good["suff_win"] == 1.0
    assert "comp_win" not in next(r for r in rows if r["method"] == "bad")


def test_last_logits_fn_matches_full_forward_on_tiny_bridge():
    from tiny_models import bridge

    model = bridge("llama")
    tokens = torch.randint(4, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)[:, -1]
    assert torch.allclose(ev.last_logits_fn(model)(tokens), full, atol=1e-5)


def test_last_logits_fn_matches_full_forward_on_hooked_transformer():
    pytest.importorskip("transformer_lens.pretrained", reason="HookedTransformer needs TL 3.9")
    from tiny_models import hooked_transformer

    for variant in ("llama_like", "gemma_like"):
        model = hooked_transformer(variant)
        tokens = torch.randint(4, 64, (2, 7), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            full = model(tokens)[:, -1]
        assert torch.allclose(ev.last_logits_fn(model)(tokens), full, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_cached_logits_match_uncached(family):
    from tiny_models import bridge

    model = bridge(family)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(4, 64, (30,), generator=g)
    fn = ev.PrefixCachedLogits(model, min_prefix=4)
    plain = ev.last_logits_fn(model)
    w = torch.rand(30, generator=g)
    w[:12] = -1.0  # rank only positions >= 12, so every perturbation keeps a 12-token prefix
    comp, suff = ev.replacement_sets(ev.ranking(w, ev.eligible_positions(30)))
    seqs = ev.perturb(clean, comp + suff, 5)
    for start in range(0, len(seqs), 7):
        batch = seqs[start:start + 7]
        assert torch.allclose(fn(batch), plain(batch), atol=1e-4)
    assert 0 < fn.prefix_tokens_run < 30 * 3  # the prefix was run a few times, not once per batch row
    # a long shared prefix first, then a shorter one: the stored cache is cropped, not recomputed
    fn = ev.PrefixCachedLogits(model, min_prefix=4)
    late, early = clean.repeat(3, 1), clean.repeat(3, 1)
    for row in range(3):  # rows differ first at position 25 (late) / 15 (early)
        late[row, 25 + row] = 5
        early[row, 15 + row] = 5
    for batch in (late, early):
        assert torch.allclose(fn(batch), plain(batch), atol=1e-4)
    assert fn.prefix_tokens_run == 25
    # batches without a shared prefix fall back to the uncached path
    other = torch.randint(4, 64, (3, 10), generator=g)
    assert torch.allclose(fn(other), plain(other), atol=1e-5)


class _BrokenCacheLM(torch.nn.Module):
    """An HF causal LM whose KV cache comes back broken: ``empty`` (what a TL 4.3 bridge returns under
    transformers >= 5.24), ``short`` (one position missing) or ``stale`` (right length, other tokens)."""

    def __init__(self, hf, how: str):
        super().__init__()
        self.inner, self.how, self.config = hf, how, hf.config

    def forward(self, input_ids, past_key_values=None, use_cache=False, **kw):
        if self.how == "stale" and use_cache and past_key_values is None:
            input_ids = (input_ids + 1) % self.config.vocab_size
        out = self.inner(input_ids=input_ids, past_key_values=past_key_values, use_cache=use_cache, **kw)
        if use_cache and past_key_values is None:
            if self.how == "empty":
                out.past_key_values = type(out.past_key_values)()
            elif self.how == "short":
                out.past_key_values.crop(-1)
        return out


@pytest.mark.parametrize("how", ["empty", "short", "stale"])
def test_prefix_cache_that_does_not_hold_the_prefix_falls_back_to_uncached(how):
    from tiny_models import hf_model

    hf = hf_model("llama")
    fn = ev.PrefixCachedLogits(_BrokenCacheLM(hf, how), min_prefix=4)
    g = torch.Generator().manual_seed(3)
    batch = torch.randint(4, 64, (1, 20), generator=g).repeat(4, 1)
    batch[torch.arange(4), 12 + torch.arange(4)] = 5  # a shared 12-token prefix
    with torch.no_grad():
        truth = torch.stack([hf(input_ids=row[None]).logits[0, -1] for row in batch])  # row by row, no cache
    with pytest.warns(RuntimeWarning, match="cannot be trusted"):
        got = fn(batch)
    assert torch.allclose(got, truth, atol=1e-5)
    assert not fn.cache_ok
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # warned once: later calls are silently uncached
        again = fn(batch[:, :18])
    assert torch.allclose(again, torch.stack([hf(input_ids=r[None]).logits[0, -1] for r in batch[:, :18]]),
                          atol=1e-5)


def test_prefix_cache_that_holds_the_prefix_is_used_without_warning():
    from tiny_models import hf_model

    hf = hf_model("llama")
    fn = ev.PrefixCachedLogits(hf, min_prefix=4)
    batch = torch.randint(4, 64, (1, 20), generator=torch.Generator().manual_seed(3)).repeat(4, 1)
    batch[torch.arange(4), 12 + torch.arange(4)] = 5
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = fn(batch)
    with torch.no_grad():
        truth = torch.stack([hf(input_ids=row[None]).logits[0, -1] for row in batch])
    assert torch.allclose(got, truth, atol=1e-5) and fn.cache_ok and fn.prefix_tokens_run == 12


# --------------------------------------------------------------------------------------
# evaluate_attribution: a TokenAttribution of a tiny model, against evaluate_faithfulness per example
# --------------------------------------------------------------------------------------


def _padded_attribution(**kw):
    from tiny_models import PAD_ID, bridge

    from gim_tl.attribution import attribute_tokens

    model = bridge("llama")
    tokens = torch.tensor([[5, 9, 12, 20, 33, 7], [PAD_ID, PAD_ID, 40, 8, 61, 17]])
    mask = tokens != PAD_ID
    attribution = attribute_tokens(model, tokens, [11, 13], attention_mask=mask, baseline="pad", progress=False, **kw)
    return model, tokens, mask, attribution


def test_evaluate_attribution_matches_each_example_evaluated_alone_unpadded():
    """The attribution's tokens, mask, scores and targets reach the metrics: each padded example scores as the
    same example evaluated on its own, unpadded, with its scores and target given by hand."""
    model, tokens, mask, attribution = _padded_attribution(contrast=[2, 2])
    res = ev.evaluate_attribution(model, attribution, baseline_id=SPACE, progress=False)
    assert set(res) == {"logit", "logprob", "logit_diff"}  # the attribution's contrast is used
    finite = 0
    for i, (target, contrast) in enumerate(((11, 2), (13, 2))):
        real = mask[i]
        alone = ev.evaluate_faithfulness(model, tokens[i, real], attribution.scores[i, real], [target],
                                         contrast_ids=[contrast], baseline_id=SPACE, progress=False)
        for scoring, result in alone.items():
            for metric in ("comprehensiveness", "sufficiency"):
                got, want = getattr(res[scoring], metric)[i].item(), getattr(result, metric).item()
                # NaN where a normalized scoring's clean value is <= 0 (dropped): then in both
                assert got == pytest.approx(want, rel=1e-4, abs=1e-6, nan_ok=True), (i, scoring, metric)
                finite += math.isfinite(want)
    assert finite >= 4  # logprob is never dropped: at least its 2 metrics x 2 examples are compared as numbers


def test_evaluate_attribution_refuses_a_position_other_than_the_last_token():
    model, _, _, attribution = _padded_attribution(position=-2)
    with pytest.raises(ValueError, match="last real token"):
        ev.evaluate_attribution(model, attribution, baseline_id=SPACE, progress=False)
