"""gim_tl against the GIM authors' package, ``gim-explain``, side by side on one HookedTransformer.

gim-explain reports 1.00–1.01× plain time for itself. This script measures
both packages on the same machine, model and batches, in one run: SmolLM2-135M-Instruct as a TL 3.9
``HookedTransformer`` (fp32), the one TL class gim-explain hooks. Passes of the three modes
(plain, gim_tl's ``GIMHookSet()``, gim-explain's ``gim.GIM(model)``) are interleaved, the order
rotating, each attached before its pass and detached after it outside the timed region; ratios are
medians of per-round ratios to the plain pass of the same round. Also printed: bytes autograd saves
for backward, and whether the forward logits are bit-identical to plain.

What each applies on this model (gim-explain 0.1.4): TSG by patching ``torch.softmax``/``F.softmax``
globally while its context is open (its softmax Function saves the scores and recomputes the forward
softmax itself), the norm freeze by detaching ``hook_scale``, q/k/v gradient scales at
``hook_q/k/v``; it has no gate/up ×½. gim_tl applies every rule of ``docs/gim.md``, gate/up included.

Needs the TL 3.9 environment and gim-explain (``pip install --no-deps gim-explain==0.1.4``; it adds
no dependency beyond torch and numpy). Usage:
``python benchmarks/vs_gim_explain.py [--shapes 1x64,8x64,1x512] [--grad-to params,inputs] [--repeats 10]``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import time
from importlib.metadata import version

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import cpu_model  # noqa: E402
from overhead import MIN_SECONDS, fwd_bwd, saved_bytes  # noqa: E402

from gim_tl import GIMHookSet  # noqa: E402
from gim_tl.models import load_model  # noqa: E402

MODES = ("plain", "gim_tl", "gim-explain")


def import_gim_explain():
    try:
        import gim
    except ImportError:
        raise SystemExit("gim-explain is not installed: pip install --no-deps gim-explain==0.1.4") from None
    return gim


def attached(mode: str, model, gim_explain) -> contextlib.AbstractContextManager:
    """The context in which ``mode``'s pass runs (entered before the timer starts)."""
    if mode == "gim_tl":
        return GIMHookSet().attach(model)
    if mode == "gim-explain":
        return gim_explain.GIM(model)
    return contextlib.nullcontext()


def measure(model, tokens, grad_to: str, repeats: int, gim_explain) -> dict:
    """Interleaved timings, saved bytes and forward identity of the three modes at one shape."""
    times: dict[str, list[float]] = {m: [] for m in MODES}

    def timed(mode: str) -> float:
        with attached(mode, model, gim_explain):
            gc.collect()
            t0 = time.perf_counter()
            fwd_bwd(model, tokens, grad_to)
            return time.perf_counter() - t0

    for mode in MODES:  # warm-up
        timed(mode)
    rounds = 0
    while rounds < repeats or sum(times["plain"]) < MIN_SECONDS:
        order = MODES[rounds % 3:] + MODES[:rounds % 3]
        for mode in order:
            times[mode].append(timed(mode))
        rounds += 1
    result = {"rounds": rounds}
    with torch.no_grad():
        plain_logits = model(tokens)
    for mode in MODES:
        ratios = [t / p for t, p in zip(times[mode], times["plain"], strict=True)]
        with attached(mode, model, gim_explain):
            saved = saved_bytes(model, tokens, grad_to)
            with torch.no_grad():
                identical = torch.equal(model(tokens), plain_logits)
        result[mode] = {"time": statistics.median(times[mode]), "ratio": statistics.median(ratios),
                        "q1": statistics.quantiles(ratios, n=4)[0], "q3": statistics.quantiles(ratios, n=4)[2],
                        "saved": saved, "identical": identical}
    return result


def table_row(shape: str, grad_to: str, r: dict) -> str:
    mib = 2**20
    ratio = {m: f"**{r[m]['ratio']:.3f}×** ({r[m]['q1']:.3f}–{r[m]['q3']:.3f})" for m in ("gim_tl", "gim-explain")}
    saved = " → ".join(f"{r[m]['saved'] / mib:.0f}" for m in MODES)
    identical = ", ".join("yes" if r[m]["identical"] else "NO" for m in ("gim_tl", "gim-explain"))
    return (f"| {shape.replace('x', ' × ')} | {grad_to} | {r['rounds']} | {r['plain']['time']:.3f} "
            f"| {ratio['gim_tl']} | {ratio['gim-explain']} | {saved} | {identical} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1x64,8x64,1x512")
    parser.add_argument("--grad-to", default="params,inputs")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    gim_explain = import_gim_explain()
    model = load_model(backend="hooked")
    torch.manual_seed(0)
    # The header first and each row as soon as it is measured, so a cut-short run keeps its rows.
    print(f"SmolLM2-135M-Instruct, HookedTransformer fp32 (TL 3.9), {cpu_model()}, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, gim-explain "
          f"{version('gim-explain')}, {time.strftime('%Y-%m-%d')}\n\n"
          "| batch × seq | backward into | rounds | plain (s) | gim_tl / plain (IQR) | gim-explain / plain (IQR) "
          "| saved plain → gim_tl → gim-explain (MiB) | forward bit-identical: gim_tl, gim-explain |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    for grad_to in args.grad_to.split(","):
        model.requires_grad_(grad_to == "params")
        for shape in args.shapes.split(","):
            batch, seq = map(int, shape.split("x"))
            tokens = torch.randint(100, 49152, (batch, seq))
            print(table_row(shape, grad_to, measure(model, tokens, grad_to, args.repeats, gim_explain)), flush=True)


if __name__ == "__main__":
    main()
