"""Views of attributions (``gim_tl.views`` and the result objects' HTML, figures, tables, DataFrames).

The results are built by hand (no model), so these tests are fast and check rendering only.
"""

from __future__ import annotations

import html
import re

import pytest
import torch

from gim_tl import views
from gim_tl.attribution import TokenAttribution, compare

TOKENS = ["<b>", " Paris", " &", '"q"', "\n", " is"]
SCORES = [0.5, -1.0, 2.0, -2.0, 0.0, 1.25]


def make_result(method="gim", scores=SCORES, tokens=TOKENS, pad=0) -> TokenAttribution:
    """A one-example result; ``pad`` left-padding columns (token '<pad>', score 0, mask False)."""
    toks = ["<pad>"] * pad + list(tokens)
    mask = torch.tensor([[False] * pad + [True] * len(tokens)])
    full = torch.tensor([[0.0] * pad + list(scores)])
    return TokenAttribution(
        tokens=[toks], token_ids=torch.arange(len(toks))[None], scores=full, mask=mask,
        target_ids=torch.tensor([7]), contrast_ids=None, target_strs=[" Paris"], position=torch.tensor([len(toks) - 1]),
        method=method, metric_values=torch.tensor([17.25]), baseline="space")


def spans(fragment: str) -> list[tuple[str, str]]:
    """(background rgb, visible text) of every token span."""
    return re.findall(r'<span class="gim-tok" style="background-color:(rgb\(\d+,\d+,\d+\));[^"]*" '
                      r'title="[^"]*">([^<]*)</span>', fragment)


def intensity(rgb: tuple[int, int, int], end: tuple[int, int, int]) -> float:
    """How far ``rgb`` lies from white toward ``end`` (0..1), from the channel that moves most."""
    k = max(range(3), key=lambda c: abs(end[c] - 255))
    return (255 - rgb[k]) / (255 - end[k])


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def test_display_token_shows_whitespace():
    assert views.display_token(" Paris") == "·Paris"
    assert views.display_token("\n\n") == "⏎⏎"
    assert views.display_token("\t") == "⇥"
    assert views.display_token("") == "∅"


@pytest.mark.parametrize("value", [0.1, 0.5, 1.0, 3.0])
def test_colors_are_symmetric_around_zero(value):
    pos, neg = views.score_color(value, 2.0), views.score_color(-value, 2.0)
    assert intensity(pos, views.POSITIVE_RGB) == pytest.approx(intensity(neg, views.NEGATIVE_RGB), abs=0.01)
    assert intensity(pos, views.POSITIVE_RGB) == pytest.approx(min(value / 2.0, 1.0), abs=0.01)
    assert views.score_color(0.0, 2.0) == views.ZERO_RGB


def test_wrap_lines_fit_width():
    tokens = [f" tok{i}" for i in range(120)]
    lines = views.wrap_lines(tokens, 100.0)
    assert [i for line in lines for i in line] == list(range(120))
    assert len(lines) > 1
    assert all(sum(views._cell_width(tokens[i]) for i in line) <= 100.0 for line in lines)


# --------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------


def test_html_escapes_every_token_and_has_one_span_each():
    result = make_result(pad=2)
    fragment = result._repr_html_()
    found = spans(fragment)
    assert len(found) == len(TOKENS) == fragment.count('class="gim-tok"')
    assert [text for _, text in found] == [html.escape(views.display_token(t), quote=True) for t in TOKENS]
    assert "<b>" not in fragment and '"q"' not in fragment
    assert "&lt;b&gt;" in fragment and "&amp;" in fragment and "&quot;q&quot;" in fragment and "⏎" in fragment
    assert "&lt;pad&gt;" not in fragment  # padding is not shown


def test_html_colors_follow_scores_symmetrically():
    fragment = make_result()._repr_html_()
    colors = {s: tuple(map(int, re.findall(r"\d+", c))) for s, (c, _) in zip(SCORES, spans(fragment), strict=True)}
    assert colors[0.0] == views.ZERO_RGB
    assert colors[2.0] == views.POSITIVE_RGB and colors[-2.0] == views.NEGATIVE_RGB
    assert intensity(colors[0.5], views.POSITIVE_RGB) == pytest.approx(0.25, abs=0.01)
    assert intensity(colors[-1.0], views.NEGATIVE_RGB) == pytest.approx(0.5, abs=0.01)


def test_html_tooltips_hold_scores(tmp_path):
    result = make_result()
    fragment = result.to_html(tmp_path / "out" / "a.html")
    for score in ("+2.00", "-1.00", "+1.25"):
        assert f": {score}" in fragment
    page = (tmp_path / "out" / "a.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and fragment in page
    assert "GIM" in fragment and "&#x27; Paris&#x27;" in fragment  # method and target in the title


def test_comparison_html_has_one_row_per_method():
    a, b = make_result("gim"), make_result("grad_x_input", scores=[-s for s in SCORES])
    fragment = compare(a, b)._repr_html_()
    assert fragment.count('class="gim-row"') == 2
    assert len(spans(fragment)) == 2 * len(TOKENS)
    assert "GIM" in fragment and "Gradient × Input" in fragment


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


@pytest.fixture
def plt():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    yield plt
    plt.close("all")


def cells(fig):
    return [p for ax in fig.axes for p in ax.patches if p.get_gid() == "gim-cell"]


def test_png_is_written(tmp_path, plt):
    path = make_result().save_png(tmp_path / "a.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_figure_has_one_cell_per_token_and_title(plt):
    fig = make_result(pad=3).plot()
    assert len(cells(fig)) == len(TOKENS)
    title = fig.axes[0].get_title(loc="left")
    assert "GIM" in title and "' Paris'" in title
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert {"·Paris", "<b>", "+2.00", "-2.00"} <= texts
    assert len(fig.axes) == 2  # heatmap + colorbar


def test_cell_colors_match_scores(plt):
    fig = make_result().plot()
    got = [tuple(round(c * 255) for c in p.get_facecolor()[:3]) for p in cells(fig)]
    assert got == [views.score_color(s, 2.0) for s in SCORES]


def test_long_prompt_wraps_into_rows(plt):
    n = 120
    result = make_result(tokens=[f" word{i}" for i in range(n)], scores=[((-1) ** i) * i / n for i in range(n)])
    fig = result.plot()
    rects = cells(fig)
    assert len(rects) == n
    rows = sorted({round(r.get_y(), 3) for r in rects})
    assert len(rows) >= 3
    width, height = fig.get_size_inches()
    assert width < 14 and height > 2  # wraps instead of growing sideways


def test_comparison_figure_has_a_strip_per_method(plt):
    results = [make_result(m, scores=[s * k for s in SCORES]) for k, m in enumerate(["gim", "plain", "tsg"], 1)]
    fig = compare(*results).plot()
    rects = cells(fig)
    assert len(rects) == 3 * len(TOKENS)
    assert len({round(r.get_y(), 3) for r in rects}) == 3
    labels = {t.get_text() for t in fig.axes[0].texts}
    assert {"GIM", "Gradient × Input", "+ TSG"} <= labels


def test_plot_into_given_axes(plt):
    fig, ax = plt.subplots()
    out = make_result().plot(ax=ax)
    assert out is fig and len(cells(fig)) == len(TOKENS)


# --------------------------------------------------------------------------------------
# DataFrames and text
# --------------------------------------------------------------------------------------


def test_dataframe_long_format():
    pytest.importorskip("pandas")
    frame = make_result(pad=2).to_dataframe()
    assert frame.shape == (len(TOKENS), 7)
    assert frame["token"].tolist() == TOKENS
    assert frame["score"].tolist() == SCORES
    assert frame["position"].tolist() == list(range(2, 2 + len(TOKENS)))


def test_comparison_dataframe_has_a_column_per_method():
    pytest.importorskip("pandas")
    a, b = make_result("gim"), make_result("integrated_gradients", scores=[2 * s for s in SCORES])
    frame = compare(a, b).to_dataframe()
    assert frame.shape == (len(TOKENS), 7)
    assert frame["GIM"].tolist() == SCORES
    assert frame["Integrated Gradients"].tolist() == [2 * s for s in SCORES]


def test_text_table_lists_tokens_and_scores():
    text = str(make_result(pad=1))
    for tok in TOKENS:
        assert views.display_token(tok) in text
    for score in ("+0.50", "-1.00", "+2.00", "-2.00", "+0.00", "+1.25"):
        assert score in text
    assert "Σ" in text and "+0.75" in text  # the sum of the scores
    assert "<pad>" not in text


def test_comparison_text_has_a_column_per_method():
    a, b = make_result("gim"), make_result("grad_x_input", scores=[-s for s in SCORES])
    text = str(compare(a, b))
    header = next(line for line in text.splitlines() if line.strip().startswith("pos"))
    assert "GIM" in header and "Gradient × Input" in header
    row = next(line for line in text.splitlines() if "·Paris" in line)
    assert "-1.00" in row and "+1.00" in row


def test_format_score_adapts_decimals():
    assert views.format_score(1.2345, 3.0) == "+1.23"
    assert views.format_score(-0.01234, 0.05) == "-0.0123"
    assert views.format_score(123.4, 250.0) == "+123"
