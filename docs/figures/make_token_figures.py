"""Render the README's token-attribution figures: GIM, gradient × input and integrated gradients on one
14-token SmolLM2 prompt, as a PNG (``Comparison.save_png``) and an HTML page (``Comparison.to_html``).

    python docs/figures/make_token_figures.py            # writes docs/figures/token_attributions.{png,html}

The README also shows a screenshot of the HTML page, taken with headless Chromium:

    chromium --headless --no-sandbox --hide-scrollbars --force-device-scale-factor=1.5 --window-size=960,225 \\
        --screenshot=docs/figures/token_attributions_html.png docs/figures/token_attributions.html
"""

from __future__ import annotations

from pathlib import Path

from gim_tl import attribute_tokens, compare, load_model

PROMPT = "When Mary and John went to the store, John gave a drink to"
HERE = Path(__file__).parent


def main() -> None:
    model = load_model()
    results = [attribute_tokens(model, PROMPT, " Mary", contrast=" John", method=m, ig_steps=50)
               for m in ("gim", "grad_x_input", "integrated_gradients")]
    assert len(results[0].real_tokens(0)) == 14
    comparison = compare(*results)
    comparison.save_png(HERE / "token_attributions.png")
    comparison.to_html(HERE / "token_attributions.html")
    print(comparison)


if __name__ == "__main__":
    main()
