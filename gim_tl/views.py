"""Rendering of token attributions: HTML heatmaps, matplotlib figures and plain-text tables.

Pure functions from tokens and scores to a view; they know nothing about models or GIM.
A view draws :class:`HeatmapBlock` s: a block is one token sequence with one or more rows of
scores over it (one row per method when comparing, one row for a single attribution).
Colors come from one diverging map centered at 0 (blue < 0 < red), shared by HTML and figures.
``normalize="global"`` puts every row on one color scale (so colors compare across methods);
``"row"`` scales each row to its own max |score|. Either way a block's numbers share one format.
matplotlib is imported only by the figure functions.
"""

from __future__ import annotations

import html
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Normalize = Literal["row", "global"]

#: Endpoint colors of the diverging map (RGB): negative, zero, positive.
NEGATIVE_RGB = (33, 102, 172)
ZERO_RGB = (255, 255, 255)
POSITIVE_RGB = (178, 24, 43)

_WHITESPACE = {" ": "·", "\n": "⏎", "\t": "⇥", "\r": "␍"}


@dataclass(frozen=True)
class HeatmapBlock:
    """One token sequence and the score rows drawn over it.

    ``rows`` holds ``(label, scores)`` pairs; every ``scores`` has ``len(tokens)`` entries.
    """

    tokens: Sequence[str]
    rows: Sequence[tuple[str, Sequence[float]]]
    caption: str = ""

    def __post_init__(self) -> None:
        for label, scores in self.rows:
            if len(scores) != len(self.tokens):
                raise ValueError(f"row {label!r} has {len(scores)} scores for {len(self.tokens)} tokens")


# --------------------------------------------------------------------------------------
# small pure helpers
# --------------------------------------------------------------------------------------


def display_token(token: str) -> str:
    """The token with whitespace made visible (``·`` space, ``⏎`` newline, ``⇥`` tab); ``∅`` if empty."""
    if token == "":
        return "∅"
    return "".join(_WHITESPACE.get(ch, ch) for ch in token)


def score_color(value: float, vmax: float) -> tuple[int, int, int]:
    """RGB of ``value`` on the diverging map over ``[-vmax, vmax]``: white at 0, linear in ``|value|``.

    Symmetric by construction: ``score_color(-v)`` has the intensity of ``score_color(v)``
    with the negative endpoint in place of the positive one.
    """
    t = 0.0 if vmax <= 0 or not math.isfinite(value) else min(abs(value) / vmax, 1.0)
    end = POSITIVE_RGB if value > 0 else NEGATIVE_RGB
    return tuple(round(z + t * (e - z)) for z, e in zip(ZERO_RGB, end, strict=True))  # type: ignore[return-value]


def text_color(value: float, vmax: float) -> str:
    """Black on light cells, white on dark ones."""
    t = 0.0 if vmax <= 0 else min(abs(value) / vmax, 1.0)
    return "#ffffff" if t > 0.6 else "#111111"


def whitespace_note(tokens: Sequence[str]) -> str:
    """What the whitespace markers among ``tokens`` mean, e.g. ``"· = a space (leading space of a word)"``."""
    names = {"·": "a space (a word's leading space)", "⏎": "a newline", "⇥": "a tab", "␍": "a carriage return"}
    used = [mark for ch, mark in _WHITESPACE.items() if any(ch in t for t in tokens)]
    return "; ".join(f"{mark} = {names[mark]}" for mark in used)


def block_number_scales(blocks: Sequence[HeatmapBlock]) -> list[float]:
    """Per block, the max |score| over all its rows: every number in the block is formatted against it,
    so all methods' rows (integrated gradients included) share one number format."""
    return [max((abs(float(v)) for _, scores in b.rows for v in scores if math.isfinite(float(v))), default=0.0)
            or 1.0 for b in blocks]


def scale_description(normalize: Normalize, vmax: float) -> str:
    """The legend's words for the color scale in use."""
    if normalize == "row":
        return "each row has its own color scale (colors: score ÷ the row's max |score|)"
    return f"one color scale for all rows: ±{format_score(vmax, vmax)[1:]}"


def row_scales(blocks: Sequence[HeatmapBlock], normalize: Normalize) -> list[list[float]]:
    """``vmax`` per block and row: its own ``max |score|`` (``"row"``) or the max over all rows (``"global"``)."""
    if normalize not in ("row", "global"):
        raise ValueError(f"normalize must be 'row' or 'global', got {normalize!r}")
    per_row = [[max((abs(s) for s in scores if math.isfinite(s)), default=0.0) or 1.0 for _, scores in b.rows]
               for b in blocks]
    if normalize == "row":
        return per_row
    top = max((v for rows in per_row for v in rows), default=1.0)
    return [[top] * len(rows) for rows in per_row]


def format_score(value: float, vmax: float) -> str:
    """Signed score with as many decimals as the row's scale needs (3 significant digits of ``vmax``)."""
    if not math.isfinite(value):
        return str(value)
    if vmax <= 0:
        return f"{value:+.2f}"
    if vmax < 1e-4 or vmax >= 1e5:
        return f"{value:+.2e}"
    decimals = max(0, 2 - math.floor(math.log10(vmax)))
    return f"{value:+.{decimals}f}"


# --------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------

_CSS = (
    "<style>"
    ".gim-tl{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px;line-height:2.1;}"
    ".gim-tl .gim-title{font-weight:bold;margin-bottom:2px;}"
    ".gim-tl .gim-caption{color:#555;margin-top:6px;}"
    ".gim-tl .gim-row{white-space:normal;}"
    ".gim-tl .gim-label{display:inline-block;min-width:11em;color:#333;font-weight:bold;vertical-align:top;"
    "padding-top:2px;}"
    ".gim-tl .gim-tok{display:inline-block;text-align:center;vertical-align:top;padding:1px 3px;margin:1px;"
    "border-radius:3px;white-space:pre;line-height:1.25;}"
    ".gim-tl .gim-score{display:block;font-size:10px;opacity:0.85;}"
    ".gim-tl .gim-legend{color:#555;font-size:11px;line-height:1.4;margin-top:6px;}"
    ".gim-tl .gim-bar{display:inline-block;vertical-align:top;margin:0 6px;}"
    ".gim-tl .gim-ramp{width:240px;height:10px;border:1px solid #bbb;}"
    ".gim-tl .gim-ticks{display:flex;justify-content:space-between;width:242px;font-size:10px;}"
    "</style>"
)


def _rgb(c: tuple[int, int, int]) -> str:
    return f"rgb({c[0]},{c[1]},{c[2]})"


def token_span(token: str, score: float, vmax: float, position: int, number_scale: float | None = None) -> str:
    """One colored ``<span class="gim-tok">``: the escaped token with its score under it, and a tooltip.

    ``vmax`` sets the color, ``number_scale`` (default ``vmax``) the number format.
    """
    number = format_score(score, vmax if number_scale is None else number_scale)
    tip = f"{token!r} (position {position}): {number}"
    return (f'<span class="gim-tok" style="background-color:{_rgb(score_color(score, vmax))};'
            f'color:{text_color(score, vmax)}" title="{html.escape(tip, quote=True)}">'
            f"{html.escape(display_token(token), quote=True)}"
            f'<span class="gim-score">{html.escape(number)}</span></span>')


def html_legend(normalize: Normalize, vmax: float, tokens: Sequence[str] = ()) -> str:
    """The color bar with numbers under it (raw scores, or ÷ the row's max for ``"row"``), and what it means."""
    lim = 1.0 if normalize == "row" else vmax
    ticks = [-lim, -lim / 2, 0.0, lim / 2, lim]
    labels = "".join(f"<span>{html.escape(_tick_label(t, lim))}</span>" for t in ticks)
    ramp = (f'<div class="gim-ramp" style="background:linear-gradient(to right,{_rgb(NEGATIVE_RGB)},'
            f'{_rgb(ZERO_RGB)},{_rgb(POSITIVE_RGB)})"></div>')
    words = [scale_description(normalize, vmax), "the number under each token is its score"]
    marks = whitespace_note(tokens)
    if marks:
        words.append(marks)
    return (f'<div class="gim-legend">negative<span class="gim-bar">{ramp}<span class="gim-ticks">{labels}</span>'
            f"</span>positive<br>{html.escape('; '.join(words))}</div>")


def _tick_label(value: float, lim: float) -> str:
    return "0" if value == 0 else format_score(value, lim)


def html_heatmap(blocks: Sequence[HeatmapBlock], *, title: str = "", normalize: Normalize = "global",
                 positions: Sequence[Sequence[int]] | None = None) -> str:
    """A self-contained HTML fragment: per block a caption and one line of colored tokens per row.

    ``positions`` (per block, per token) are shown in tooltips; default ``0..n-1``.
    """
    scales = row_scales(blocks, normalize)
    numbers = block_number_scales(blocks)
    label_ch = max([len(label) for b in blocks for label, _ in b.rows] + [0]) + 2   # rows line up
    parts = [_CSS, '<div class="gim-tl">']
    if title:
        parts.append(f'<div class="gim-title">{html.escape(title).replace(chr(10), "<br>")}</div>')
    for b, (block, vmaxes) in enumerate(zip(blocks, scales, strict=True)):
        pos = list(positions[b]) if positions is not None else list(range(len(block.tokens)))
        if block.caption:
            parts.append(f'<div class="gim-caption">{html.escape(block.caption)}</div>')
        for (label, scores), vmax in zip(block.rows, vmaxes, strict=True):
            spans = "".join(token_span(t, float(s), vmax, p, numbers[b])
                            for t, s, p in zip(block.tokens, scores, pos, strict=True))
            label_html = (f'<span class="gim-label" style="min-width:{label_ch}ch">{html.escape(label)}</span>'
                          if label else "")
            parts.append(f'<div class="gim-row">{label_html}{spans}</div>')
    top = max((max(v) for v in scales if v), default=1.0)
    parts.append(html_legend(normalize, top, [t for b in blocks for t in b.tokens]) + "</div>")
    return "".join(parts)


def html_page(fragment: str, title: str = "gim_tl attributions") -> str:
    """Wrap an HTML fragment into a standalone page."""
    title = title.split("\n", 1)[0]
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>'
            f"<body>{fragment}</body></html>\n")


# --------------------------------------------------------------------------------------
# plain text
# --------------------------------------------------------------------------------------


def _bar(value: float, vmax: float, width: int = 10) -> str:
    """A signed bar: ``████|`` for negative, ``|████`` for positive values."""
    n = 0 if vmax <= 0 else round(min(abs(value) / vmax, 1.0) * width)
    if value < 0:
        return " " * (width - n) + "█" * n + "|" + " " * width
    return " " * width + "|" + "█" * n + " " * (width - n)


def text_table(tokens: Sequence[str], columns: Sequence[tuple[str, Sequence[float]]], *, title: str = "",
               positions: Sequence[int] | None = None, bars: bool | None = None, total: bool = True) -> str:
    """A fixed-width table: position, token, one score column per ``(name, scores)``, and a ``Σ`` row.

    With a single column (default) a signed bar is drawn beside the score.
    """
    positions = list(positions) if positions is not None else list(range(len(tokens)))
    shown = [display_token(t) for t in tokens]
    bars = len(columns) == 1 if bars is None else bars
    vmaxes = [max((abs(s) for s in scores), default=0.0) for _, scores in columns]
    shared = max(vmaxes, default=0.0)   # one number format for every column
    cells = [[format_score(float(s), shared) for s in scores] for _, scores in columns]
    tok_w = max([5] + [len(s) for s in shown])
    names = [name for name, _ in columns]
    col_w = [max([len(name)] + [len(c) for c in col]) for name, col in zip(names, cells, strict=True)]
    lines = [title] if title else []
    header = f"{'pos':>4}  {'token':<{tok_w}}" + "".join(f"  {name:>{w}}" for name, w in zip(names, col_w, strict=True))
    lines += [header, "-" * len(header)]
    for i, (p, tok) in enumerate(zip(positions, shown, strict=True)):
        row = f"{p:>4}  {tok:<{tok_w}}" + "".join(f"  {col[i]:>{w}}" for col, w in zip(cells, col_w, strict=True))
        if bars:
            row += "  " + _bar(float(columns[0][1][i]), vmaxes[0])
        lines.append(row.rstrip())
    if total:
        sums = [format_score(math.fsum(float(s) for s in scores), shared) for _, scores in columns]
        lines.append("-" * len(header))
        lines.append(f"{'':>4}  {'Σ':<{tok_w}}" + "".join(f"  {s:>{w}}" for s, w in zip(sums, col_w, strict=True)))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# matplotlib
# --------------------------------------------------------------------------------------

#: Layout units of :func:`heatmap_figure`: one unit of x is one monospace character.
_CHAR_IN = 0.083      # inches per character at the token font size
_ROW_IN = 0.50        # inches per score row
_TOKEN_FONT = 10
_SCORE_FONT = 7.5
_TITLE_FONT = 11


def _cell_width(token: str) -> float:
    return max(len(display_token(token)) + 1.2, 6.0)


def wrap_lines(tokens: Sequence[str], max_width: float) -> list[list[int]]:
    """Greedy line breaking: token indices per line so that each line's cell widths fit ``max_width``."""
    lines: list[list[int]] = [[]]
    used = 0.0
    for i, tok in enumerate(tokens):
        w = _cell_width(tok)
        if lines[-1] and used + w > max_width:
            lines.append([])
            used = 0.0
        lines[-1].append(i)
        used += w
    return lines


def _wrap_title(title: str, width_in: float) -> list[str]:
    """Title lines that fit ``width_in`` inches at the title font (about 0.085 in per bold character)."""
    if not title:
        return []
    chars = max(int(width_in / 0.085), 30)
    return [line for part in title.split("\n") for line in (textwrap.wrap(part, chars) or [""])]


def diverging_cmap(n: int = 256):
    """The map of :func:`score_color` as a matplotlib colormap over ``[-1, 1]``."""
    from matplotlib.colors import ListedColormap

    values = [2 * k / (n - 1) - 1 for k in range(n)]
    return ListedColormap([tuple(c / 255 for c in score_color(v, 1.0)) for v in values], name="gim_tl_diverging")


#: Layout (in row units) of the colorbar under the grid: gap above it, its height, room for ticks and label.
_CBAR_GAP, _CBAR_H, _CBAR_TEXT = 0.45, 0.38, 1.45


def colorbar_ticks(lim: float, width_in: float) -> list[float]:
    """Symmetric ticks over ``[-lim, lim]``: five when the bar is at least 3 inches wide, else three."""
    if width_in >= 3.0:
        return [-lim, -lim / 2, 0.0, lim / 2, lim]
    return [-lim, 0.0, lim]


def heatmap_figure(blocks: Sequence[HeatmapBlock], *, title: str = "", normalize: Normalize = "global",
                   ax=None, max_width: float = 100.0, colorbar: bool = True, note: str = ""):
    """A heatmap figure: per block, tokens along x in wrapped lines, one strip of colored cells per row.

    Each cell shows the token and its score (one number format per block); cells are ``Rectangle``
    patches with ``gid="gim-cell"``. The colorbar sits under the cells, exactly as wide and centred,
    and its label says which color scale is in use (``normalize``), what ``·`` means, and ``note``
    (e.g. the baseline). Returns the matplotlib ``Figure`` (``ax.figure`` when ``ax`` is given).
    """
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize as MplNormalize
    from matplotlib.patches import Rectangle

    scales = row_scales(blocks, normalize)
    numbers = block_number_scales(blocks)
    layout = [wrap_lines(b.tokens, max_width) for b in blocks]
    label_w = max([len(label) for b in blocks for label, _ in b.rows] + [0])
    label_w = label_w + 2 if label_w else 0
    n_strips = sum(len(lines) * len(b.rows) for b, lines in zip(blocks, layout, strict=True))
    n_captions = sum(1 for b in blocks if b.caption)
    n_gaps = sum(len(lines) for lines in layout)
    line_widths = [sum(_cell_width(b.tokens[i]) for i in line)
                   for b, lines in zip(blocks, layout, strict=True) for line in lines]
    used_w = max(line_widths, default=10.0)
    height_units = n_strips + 0.8 * n_captions + 0.35 * n_gaps + (_CBAR_GAP + _CBAR_H + _CBAR_TEXT if colorbar else 0)

    if ax is None:
        fig_w = max((label_w + used_w) * _CHAR_IN + 0.4, 5.5)
        fig_h = height_units * _ROW_IN + 0.2 + 0.25 * len(_wrap_title(title, fig_w))
        fig, ax = plt.subplots(figsize=(fig_w, fig_h), layout="constrained")
    else:
        fig = ax.figure

    y = 0.0
    for block, lines, vmaxes, number_scale in zip(blocks, layout, scales, numbers, strict=True):
        if block.caption:
            ax.text(-label_w, y + 0.45, block.caption, ha="left", va="center", fontsize=_TOKEN_FONT,
                    style="italic", color="#333333")
            y += 0.8
        for line in lines:
            for (label, scores), vmax in zip(block.rows, vmaxes, strict=True):
                if label:
                    ax.text(-1.0, y + 0.5, label, ha="right", va="center", fontsize=_TOKEN_FONT, weight="bold")
                x = 0.0
                for i in line:
                    w, s = _cell_width(block.tokens[i]), float(scores[i])
                    color = tuple(c / 255 for c in score_color(s, vmax))
                    ax.add_patch(Rectangle((x + 0.1, y + 0.04), w - 0.2, 0.92, facecolor=color, edgecolor="#bbbbbb",
                                           linewidth=0.5, gid="gim-cell"))
                    ink = text_color(s, vmax)
                    ax.text(x + w / 2, y + 0.36, display_token(block.tokens[i]), ha="center", va="center",
                            fontsize=_TOKEN_FONT, family="DejaVu Sans Mono", color=ink)
                    ax.text(x + w / 2, y + 0.76, format_score(s, number_scale), ha="center", va="center",
                            fontsize=_SCORE_FONT, color=ink)
                    x += w
                y += 1.0
            y += 0.35
    grid_end = max(y - 0.35, 1.0)
    bottom = grid_end + (_CBAR_GAP + _CBAR_H + _CBAR_TEXT if colorbar else 0.0)
    ax.set_xlim(-label_w - 0.5, used_w + 0.5)
    ax.set_ylim(bottom, -0.1)
    ax.axis("off")
    if note and not colorbar:
        title = f"{title}  ({note})" if title else note
    if title:
        ax.set_title("\n".join(_wrap_title(title, fig.get_figwidth())), loc="left",
                     fontsize=_TITLE_FONT, weight="bold")
    if colorbar:
        top = max((max(v) for v in scales if v), default=1.0)
        lim = 1.0 if normalize == "row" else top
        mappable = ScalarMappable(norm=MplNormalize(-lim, lim), cmap=diverging_cmap())
        # In the heatmap's own data units: under the cells, as wide as the widest line, centred on it.
        x0, x1 = ax.get_xlim()
        span_y = bottom + 0.1
        cb_top = grid_end + _CBAR_GAP
        cax = ax.inset_axes([(0.0 - x0) / (x1 - x0), (bottom - cb_top - _CBAR_H) / span_y,
                             used_w / (x1 - x0), _CBAR_H / span_y])
        cbar = fig.colorbar(mappable, cax=cax, orientation="horizontal")
        ticks = colorbar_ticks(lim, used_w * _CHAR_IN)
        cbar.set_ticks(ticks, labels=[_tick_label(t, lim) for t in ticks])
        cbar.ax.tick_params(labelsize=8)
        what = "score ÷ the row's max |score|" if normalize == "row" else "score"
        extra = [scale_description(normalize, top)]
        marks = whitespace_note([t for b in blocks for t in b.tokens])
        if marks:
            extra.append(marks)
        if note:
            extra.append(note)
        cbar.set_label(f"{what}   ({'; '.join(extra[:1])})\n{'; '.join(extra[1:])}".rstrip(), fontsize=8.5)
    return fig


def save_figure(fig, path, dpi: int = 150) -> None:
    """Write ``fig`` as PNG (or any format matplotlib infers from ``path``) and close it."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white")
    plt.close(fig)
