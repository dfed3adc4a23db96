"""Self-repair analysis: the spec's toy row by hand, a per-row loop reference, and a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from gim_tl import self_repair as sr


def test_toy_row_by_hand():
    """Scores (5, 5, 0, 0), readout c = (1, 1, 0, 0): the worked row of docs/evaluation.md."""
    eff = sr.row_effects(torch.tensor([[5.0, 5.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0, 0.0]]),
                         torch.ones(1, 4, dtype=torch.bool), temperature=2.0)
    e5, e25 = math.exp(5), math.exp(2.5)
    a1 = e5 / (2 * e5 + 2)                      # pattern at a big key
    f = 2 * a1                                  # F = A1 + A2
    plain_grad = a1 * (1 - f)                   # A_j (c_j - F)
    at1 = e25 / (2 * e25 + 2)                   # softmax(S / 2) at a big key
    tsg_grad = at1 * (1 - 2 * at1)
    mean_s = 2.5                                # mean of the row's scores
    d1 = f - (e25 + e5) / (e25 + e5 + 2)        # key 1 set to the mean score 2.5
    d12 = f - 2 * e25 / (2 * e25 + 2)           # both big keys at 2.5
    interaction = (d12 - 2 * d1) / d12

    assert eff.F.item() == pytest.approx(f, rel=1e-12)
    assert eff.p1.item() == pytest.approx(a1) and eff.p2.item() == pytest.approx(a1)
    assert {eff.j1.item(), eff.j2.item()} == {0, 1}
    assert eff.delta1.item() == pytest.approx(d1, rel=1e-9)
    assert eff.delta2.item() == pytest.approx(d1, rel=1e-9)
    assert eff.delta12.item() == pytest.approx(d12, rel=1e-9)
    assert eff.interaction.item() == pytest.approx(interaction, rel=1e-9)
    assert eff.plain_pred.item() == pytest.approx(2 * plain_grad * (5 - mean_s), rel=1e-9)
    assert eff.tsg_pred.item() == pytest.approx(2 * tsg_grad * (5 - mean_s), rel=1e-9)
    # The spec's rounded numbers follow from the formulas above.
    assert (a1, f, plain_grad, tsg_grad) == pytest.approx((0.4967, 0.9933, 0.00332, 0.0351), abs=5e-5)
    assert (d1, d12, interaction) == pytest.approx((0.0056, 0.0692, 0.84), abs=5e-3)


def test_readout_grad_at_t1_is_autograd():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(6, 7, generator=g, dtype=torch.float64)
    valid = torch.ones(6, 7, dtype=torch.bool).tril(1)  # rows with 2..7 valid keys
    sr.readout_value(s, c, valid).sum().backward()
    assert torch.allclose(sr.softmax_readout_grad(s.detach(), c, valid, 1.0), s.grad)
    tsg = sr.softmax_readout_grad(s.detach(), c, valid, 2.0)
    assert torch.all(tsg[~valid] == 0) and torch.allclose(tsg.sum(-1), torch.zeros(6, dtype=torch.float64))


def test_interaction_index_zero_when_joint_effect_zero():
    out = sr.interaction_index(torch.tensor([0.1, 0.0]), torch.tensor([0.2, 0.0]), torch.tensor([0.6, 0.0]))
    assert out.tolist() == pytest.approx([0.5, 0.0])


def _ref_readout(scores: dict, c_row: list, keys: list) -> float:
    w = {j: math.exp(scores[j]) for j in keys}
    return sum(w[j] * c_row[j] for j in keys) / sum(w.values())


def _ref_grad(j: int, t: float, scores: dict, c_row: list, keys: list) -> float:
    at = {k: math.exp(scores[k] / t) for k in keys}
    z = sum(at.values())
    avg = sum(at[k] / z * c_row[k] for k in keys)
    return at[j] / z * (c_row[j] - avg)


def loop_reference(s, c, valid, temperature):
    """Row by row, with explicit Python loops over keys (independent of the vectorized code)."""
    out = []
    for i in range(s.shape[0]):
        keys = [j for j in range(s.shape[1]) if valid[i, j]]
        c_row = [float(v) for v in c[i]]
        base = {j: float(s[i, j]) for j in keys}
        a = {j: math.exp(base[j]) / sum(math.exp(base[k]) for k in keys) for j in keys}
        p = {j: a[j] * c_row[j] for j in keys}
        j1, j2 = sorted(keys, key=lambda j: -p[j])[:2]
        mean = sum(base.values()) / len(keys)
        f0 = _ref_readout(base, c_row, keys)
        d1 = f0 - _ref_readout({**base, j1: mean}, c_row, keys)
        d2 = f0 - _ref_readout({**base, j2: mean}, c_row, keys)
        d12 = f0 - _ref_readout({**base, j1: mean, j2: mean}, c_row, keys)
        plain = sum(_ref_grad(j, 1.0, base, c_row, keys) * (base[j] - mean) for j in (j1, j2))
        tsg = sum(_ref_grad(j, temperature, base, c_row, keys) * (base[j] - mean) for j in (j1, j2))
        out.append(dict(d1=d1, d2=d2, d12=d12, p2=p[j2], plain=plain, tsg=tsg))
    return out


def test_vectorized_rows_match_loop_reference():
    g = torch.Generator().manual_seed(3)
    rows, keys = 12, 9
    s = 3 * torch.randn(rows, keys, generator=g, dtype=torch.float64)
    c = torch.randn(rows, keys, generator=g, dtype=torch.float64)
    valid = torch.rand(rows, keys, generator=g) < 0.7
    valid[:, :2] = True
    s_masked = torch.where(valid, s, torch.full_like(s, -3.4e38))  # bridge-style masked scores
    eff = sr.row_effects(s_masked, c, valid, temperature=2.0)
    ref = loop_reference(s, c, valid, 2.0)
    for name, key in (("delta1", "d1"), ("delta2", "d2"), ("delta12", "d12"), ("p2", "p2"),
                      ("plain_pred", "plain"), ("tsg_pred", "tsg")):
        assert getattr(eff, name).tolist() == pytest.approx([r[key] for r in ref], rel=1e-9, abs=1e-12), name


def test_rows_with_one_key_are_never_selected():
    s = torch.tensor([[1.0, -math.inf], [1.0, 1.0]])
    c = torch.tensor([[5.0, 0.0], [2.0, 2.0]])
    valid = torch.isfinite(s)
    eff = sr.row_effects(s, c, valid)
    eff.example = torch.zeros(2, dtype=torch.long)
    assert eff.delta2[0].item() == 0 and eff.delta12[0].item() == eff.delta1[0].item()
    assert sr.select_rows(eff, threshold=0.5).tolist() == [False, True]
    assert sr.select_rows(eff).tolist() == [False, True]


def test_relative_threshold_is_per_example():
    eff = sr.row_effects(torch.zeros(3, 2), torch.tensor([[10.0, 10.0], [1.0, 1.0], [0.05, 0.05]]),
                         torch.ones(3, 2, dtype=torch.bool))
    eff.example = torch.tensor([0, 0, 1])
    # example 0: largest p = 5, tau = 0.5 -> row 0 (p2 = 5) kept, row 1 (p2 = 0.5) not; example 1 kept alone.
    assert sr.select_rows(eff, rel_threshold=0.1).tolist() == [True, False, True]
    assert sr.select_rows(eff, threshold=1.0).tolist() == [True, False, False]


def test_spearman_against_hand_ranks():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert sr.spearman(x, x**3) == pytest.approx(1.0)
    assert sr.spearman(x, -x) == pytest.approx(-1.0)
    # ranks (1,2,3,4,5) vs (2,1,4,3,5): 1 - 6*sum(d^2)/(n(n^2-1)) = 1 - 6*4/120 = 0.8
    assert sr.spearman(x, torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0])) == pytest.approx(0.8)
    # ties share the mean of their ranks: y = (3, 1, 3, 2) has ranks (3.5, 1, 3.5, 2); x = (1, 2, 3, 4).
    # Centered: rx = (-1.5, -.5, .5, 1.5), ry = (1, -1.5, 1, -.5); Σ rx·ry = -1.5 + .75 + .5 - .75 = -1,
    # Σ rx² = 5, Σ ry² = 4.5, so ρ = -1 / √22.5.
    y = torch.tensor([3.0, 1.0, 3.0, 2.0])
    assert sr.spearman(x[:4], y) == pytest.approx(-1 / math.sqrt(22.5), rel=1e-12)
    assert math.isnan(sr.spearman(x[:2], x[:2]))                 # too few pairs
    assert math.isnan(sr.spearman(x, torch.full((5,), 2.0)))     # a constant input has no ranking
    with pytest.raises(ValueError, match="equally long"):
        sr.spearman(x, x[:4])


def test_summary_on_toy_rows():
    s = torch.tensor([[5.0, 5.0, 0.0, 0.0], [5.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    c = torch.tensor([[1.0, 1.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    eff = sr.row_effects(s, c, torch.ones(3, 4, dtype=torch.bool))
    eff.example = torch.zeros(3, dtype=torch.long)
    summ = sr.summarize(eff)
    assert summ.n_rows == 3 and summ.n_selected == 2
    assert summ.frac_interaction_above == 1.0 and summ.median_interaction == pytest.approx(0.8378, abs=1e-3)
    # plain underestimates the joint effect ~4x, TSG (no 1/T) overshoots ~2.5x
    d12, plain, tsg = eff.delta12[0].item(), eff.plain_pred[0].item(), eff.tsg_pred[0].item()
    assert summ.median_ratio_plain == pytest.approx(plain / d12) and summ.median_ratio_plain < 0.3
    assert summ.median_ratio_tsg == pytest.approx(tsg / d12) and summ.median_ratio_tsg > 2


# ---------------------------------------------------------------------------------------------
# On a tiny TransformerBridge (GQA: 4 query heads, 2 key/value heads)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from tiny_models import bridge

    return bridge("llama")


def test_tiny_model_rows_match_independent_captures(tiny):
    tokens = torch.randint(4, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    targets = [5, 9]
    eff = sr.self_repair_rows(tiny, tokens, targets, readout="z")
    n_layers, n_heads, n_pos = tiny.cfg.n_layers, tiny.cfg.n_heads, tokens.shape[1]
    assert len(eff) == 2 * n_layers * n_heads * n_pos
    # readout z: F = ||z_i||^2, checked against run_with_cache.
    _, cache = tiny.run_with_cache(tokens[1:2])
    z = cache["blocks.1.attn.hook_z"][0]  # [pos, head, d]
    rows = (eff.example == 1) & (eff.layer == 1)
    got = torch.zeros(n_heads, n_pos, dtype=torch.float64)
    got[eff.head[rows], eff.query[rows]] = eff.F[rows]
    assert torch.allclose(got, z.double().square().sum(-1).T, rtol=1e-4, atol=1e-6)

    # readout g_z: F = g_z . z, with g_z from an independent zero-perturbation at hook_z.
    eff_g = sr.self_repair_rows(tiny, tokens[1:2], targets[1:], readout="grad", layers=[1])
    delta = torch.zeros(1, n_pos, n_heads, tiny.cfg.d_head, requires_grad=True)
    with tiny.hooks(fwd_hooks=[("blocks.1.attn.hook_z", lambda x, hook: x + delta)]):
        logit = tiny(tokens[1:2])[0, -1, targets[1]]
    (g,) = torch.autograd.grad(logit, delta)
    expected = (g[0] * z).sum(-1).T.double()
    got = torch.zeros(n_heads, n_pos, dtype=torch.float64)
    got[eff_g.head, eff_g.query] = eff_g.F
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)
    # first query row has a single key: never selected
    assert torch.all(eff_g.p2[eff_g.query == 0] == -math.inf)


def test_plot_writes_png(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    tokens = torch.randint(4, 64, (1, 10), generator=torch.Generator().manual_seed(2))
    eff = sr.self_repair_rows(tiny, tokens, [7])
    sel = sr.select_rows(eff)
    path = sr.plot_self_repair(eff, sel, str(tmp_path / "sr.png"))
    assert (tmp_path / "sr.png").stat().st_size > 1000 and path.endswith("sr.png")
