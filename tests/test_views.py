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
    """(background rgb, visible token text) of every token span."""
    return [(rgb, tok) for rgb, tok, _ in spans_with_scores(fragment)]


def spans_with_scores(fragment: str) -> list[tuple[str, str, str]]:
    """(background rgb, visible token text, visible score) of every token span."""
    return re.findall(r'<span class="gim-tok" style="background-color:(rgb\(\d+,\d+,\d+\));[^"]*" '
                      r'title="[^"]*">([^<]*)<span class="gim-score">([^<]*)</span></span>', fragment)


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
    assert len(fig.axes) == 1 and len(fig.axes[0].child_axes) == 1  # heatmap, its colorbar inside


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


# --------------------------------------------------------------------------------------
# Scales, colorbar and legends
# --------------------------------------------------------------------------------------

FOURTEEN = ["When", " Mary", " and", " John", " went", " to", " the", " store", ",", " John", " gave", " a", " drink",
            " to"]


def three_methods(n: int = 14):
    """GIM, gradient × input (scores ×3) and IG (scores ÷ 40: another magnitude) on the same tokens."""
    base = [((-1) ** i) * (i + 1) / n for i in range(n)]
    tokens = FOURTEEN[:n]
    return [make_result("gim", base, tokens), make_result("grad_x_input", [3 * s for s in base], tokens),
            make_result("integrated_gradients", [s / 40 for s in base], tokens)]


def test_comparison_figure_uses_one_shared_scale_by_default(plt):
    results = three_methods()
    top = max(abs(s) for s in results[1].real_scores(0))
    fig = compare(*results).plot()
    got = [tuple(round(c * 255) for c in p.get_facecolor()[:3]) for p in cells(fig)]
    want = [views.score_color(s, top) for r in results for s in r.real_scores(0)]
    assert got == want
    label = fig.axes[0].child_axes[0].get_xlabel()
    assert "one color scale for all rows" in label and "±3.00" in label

    fig = compare(*results).plot(scale="row")
    got = [tuple(round(c * 255) for c in p.get_facecolor()[:3]) for p in cells(fig)]
    want = [views.score_color(s, max(abs(v) for v in r.real_scores(0))) for r in results for s in r.real_scores(0)]
    assert got == want
    assert "each row has its own color scale" in fig.axes[0].child_axes[0].get_xlabel()
    with pytest.raises(ValueError, match="scale must be 'shared'"):
        compare(*results).plot(scale="global")


def test_colorbar_spans_the_grid_with_readable_ticks(plt):
    """14 tokens: the bar is as wide as the cells and centred under them; its tick labels do not overlap."""
    fig = compare(*three_methods()).plot()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [p.get_window_extent(renderer) for p in cells(fig)]
    grid_x0, grid_x1 = min(b.x0 for b in boxes), max(b.x1 for b in boxes)
    cbar_ax = fig.axes[0].child_axes[0]
    bar = cbar_ax.get_window_extent(renderer)
    cell_px = boxes[0].width
    assert abs(bar.x0 - grid_x0) < 0.1 * cell_px and abs(bar.x1 - grid_x1) < 0.1 * cell_px
    assert bar.y1 < min(b.y0 for b in boxes)   # under the grid
    labels = [t for t in cbar_ax.get_xticklabels() if t.get_text()]
    assert [t.get_text() for t in labels] == ["-3.00", "-1.50", "0", "+1.50", "+3.00"]
    extents = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
    assert all(a.x1 + 5 < b.x0 for a, b in zip(extents, extents[1:], strict=False))
    fig_box = fig.bbox
    assert extents[0].x0 >= fig_box.x0 and extents[-1].x1 <= fig_box.x1


def test_whitespace_marker_is_explained(plt):
    fig = make_result().plot()
    assert "· = a space" in fig.axes[0].child_axes[0].get_xlabel()
    assert "⏎ = a newline" in fig.axes[0].child_axes[0].get_xlabel()
    assert "· = a space" in make_result()._repr_html_()
    no_space = make_result(tokens=["a", "b"], scores=[1.0, -1.0])
    assert "· =" not in no_space._repr_html_()


def test_one_number_format_for_every_method(plt):
    """IG's small scores are written with the block's decimals, not their own."""
    results = three_methods(4)
    fig = compare(*results).plot()
    numbers = [t.get_text() for t in fig.axes[0].texts if t.get_text()[:1] in "+-"]
    assert len(numbers) == 12 and {len(n.split(".")[1]) for n in numbers} == {2}
    assert "+0.02" in numbers   # IG's 0.75/40 written as +0.02, like the others (not +0.0188)
    text = str(compare(*results))
    assert "+0.02" in text and "0.0188" not in text
    html_numbers = [n for _, _, n in spans_with_scores(compare(*results)._repr_html_())]
    assert numbers == html_numbers


def test_html_shows_scores_and_a_numbered_legend():
    fragment = compare(*three_methods())._repr_html_()
    found = spans_with_scores(fragment)
    assert len(found) == 3 * 14 and all(score[:1] in "+-" for _, _, score in found)
    legend = fragment[fragment.index('class="gim-legend"'):]
    ticks = re.findall(r"<span>([^<]*)</span>", legend[legend.index("gim-ticks"):])
    assert ticks == ["-3.00", "-1.50", "0", "+1.50", "+3.00"]
    assert "one color scale for all rows: ±3.00" in legend
    row_legend = compare(*three_methods()).to_html(scale="row")
    assert "each row has its own color scale" in row_legend
    assert re.findall(r"<span>([^<]*)</span>", row_legend[row_legend.index("gim-ticks"):])[:5] == \
        ["-1.00", "-0.50", "0", "+0.50", "+1.00"]
