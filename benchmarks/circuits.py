"""Circuit discovery with GIM on SmolLM2-135M-Instruct, scored the way MIB's circuit-localization track scores it.

For the shipped IOI and factual-recall sets (counterfactual corruptions; metric: logit difference, IOI answer −
distractor, factual recall answer − counterfactual answer), on examples whose clean prompt the model completes
correctly and whose clean and corrupt prompts have the same token length (one batch of equal length per set):

* edge scores from EAP (plain gradients), EAP-GIM, EAP with each GIM rule alone, EAP-IG on the inputs (plain and
  GIM gradients) and a random ranking, over the ungrouped-GQA graph of a TL 3.9 HookedTransformer;
* the faithfulness curve of each ranking at MIB's edge fractions (edge patching with current activations), its
  CPR (area under f) and CMD (area under |1 − f|), and the time to score and to evaluate.

Writes ``benchmarks/results_circuits.md``, ``benchmarks/figures/circuits_<set>.png`` and prints the table.
Run (TL 3.9 venv, HookedTransformer): ``HF_HUB_OFFLINE=1 .venv39/bin/python benchmarks/circuits.py [--n-examples 8]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from _common import correct_pairs, cpu_model  # noqa: E402

from gim_tl import GIMHookSet  # noqa: E402
from gim_tl.circuits import FaithfulnessCurve, faithfulness_curve, plot_curves, random_edges  # noqa: E402
from gim_tl.data import load_factual_recall, load_ioi  # noqa: E402
from gim_tl.models import load_model  # noqa: E402
from gim_tl.patching import eap, logit_diff_metric  # noqa: E402

HERE = Path(__file__).resolve().parent
#: method label -> (preset, IG steps or None); "random" is handled apart.
METHODS: dict[str, tuple[str, int | None]] = {
    "EAP": ("plain", None),
    "EAP-GIM": ("gim", None),
    "EAP (TSG only)": ("tsg", None),
    "EAP (norm freeze only)": ("freeze_norm", None),
    "EAP (grad. norm. only)": ("grad_norm", None),
    "EAP-IG": ("plain", 5),
    "EAP-IG-GIM": ("gim", 5),
}


@dataclass
class Batch:
    clean: torch.Tensor
    corrupt: torch.Tensor
    answer: list[int]
    wrong: list[int]
    n_candidates: int


def one_batch(model, rows, wrong_field: str, n: int) -> Batch:
    """Up to ``n`` examples of the most common token length among those with equal clean/corrupt length,
    one-token answers and a correct clean top-1 (file order)."""
    pairs, n_candidates = correct_pairs(model, rows, wrong_field)
    by_len: dict[int, list] = {}
    for p in pairs:
        by_len.setdefault(len(p[0]), []).append(p)
    length = max(by_len, key=lambda k: (len(by_len[k]), -k))
    chosen = by_len[length][:n]
    return Batch(torch.tensor([c[0] for c in chosen]), torch.tensor([c[1] for c in chosen]),
                 [c[2] for c in chosen], [c[3] for c in chosen], n_candidates)


def run_set(model, name: str, batch: Batch, ig_steps: int, progress: bool) -> dict:
    metric = logit_diff_metric(batch.answer, batch.wrong)
    curves: dict[str, FaithfulnessCurve] = {}
    seconds: dict[str, tuple[float, float]] = {}
    edges = None
    baselines = None   # m(full), m(∅): computed with the first method's curve, shared by the others
    for label, (preset, steps) in METHODS.items():
        steps = ig_steps if steps is not None else None
        start = time.perf_counter()
        edges = eap(model, batch.clean, batch.corrupt, metric, hook_set=GIMHookSet.preset(preset), ig_steps=steps,
                    progress=progress)
        t_score = time.perf_counter() - start
        start = time.perf_counter()
        curves[label] = faithfulness_curve(model, edges, batch.clean, batch.corrupt, metric, baselines=baselines,
                                           progress=progress)
        baselines = (curves[label].clean, curves[label].corrupt)
        seconds[label] = (t_score, time.perf_counter() - start)
        print(f"  {name} {label}: CPR {curves[label].cpr:.3f} CMD {curves[label].cmd:.3f} "
              f"(score {t_score:.1f} s, evaluate {seconds[label][1]:.1f} s)", flush=True)
    start = time.perf_counter()
    rand = random_edges(edges, seed=0)
    t_score = time.perf_counter() - start
    start = time.perf_counter()
    curves["random"] = faithfulness_curve(model, rand, batch.clean, batch.corrupt, metric, baselines=baselines,
                                          progress=progress)
    seconds["random"] = (t_score, time.perf_counter() - start)
    return {"curves": curves, "seconds": seconds, "n_edges": edges.n_edges, "batch": batch}


def table(results: dict[str, dict]) -> str:
    lines = ["| set | method | CPR ↑ | CMD ↓ | f at 0.1 / 1 / 10 % | score (s) | evaluate (s) |",
             "|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for label, curve in res["curves"].items():
            f = dict(zip(curve.fractions, curve.faithfulness, strict=True))
            t_score, t_eval = res["seconds"][label]
            lines.append(f"| {name} | {label} | {curve.cpr:.3f} | {curve.cmd:.3f} | "
                         f"{f.get(0.001, float('nan')):.2f} / {f.get(0.01, float('nan')):.2f} / "
                         f"{f.get(0.1, float('nan')):.2f} | {t_score:.1f} | {t_eval:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-examples", type=int, default=8, help="prompts per set (one batch)")
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sets", nargs="+", default=["ioi", "factual_recall"])
    parser.add_argument("--out", type=Path, default=None, help="default: results_circuits_<sets>.md")
    parser.add_argument("--figures", type=Path, default=HERE / "figures")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    args.out = args.out or HERE / f"results_circuits_{'_'.join(args.sets)}.md"
    torch.set_num_threads(args.threads)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = time.perf_counter()
    model = load_model(backend="hooked")
    loaders = {"ioi": (load_ioi, "distractor"), "factual_recall": (load_factual_recall, "corrupt_answer")}
    results = {}
    for name in args.sets:
        loader, wrong_field = loaders[name]
        batch = one_batch(model, loader(), wrong_field, args.n_examples)
        print(f"{name}: {batch.clean.shape[0]} prompts of {batch.clean.shape[1]} tokens "
              f"(of {batch.n_candidates} candidates)", flush=True)
        results[name] = run_set(model, name, batch, args.ig_steps, not args.no_progress)
        args.figures.mkdir(parents=True, exist_ok=True)
        fig = plot_curves(list(results[name]["curves"].values()),
                          title=f"SmolLM2-135M-Instruct, {name}: faithfulness of top-n edge circuits")
        fig.tight_layout()
        fig.savefig(args.figures / f"circuits_{name}.png", dpi=120)
        plt.close(fig)
    total = time.perf_counter() - start
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    from importlib.metadata import version

    header = (f"**Device:** CPU, {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} with "
              f"{args.threads} thread(s); TransformerLens {version('transformer_lens')} HookedTransformer; "
              f"{datetime.date.today()}, commit {commit}; total {total / 60:.1f} min.")
    sizes = "; ".join(f"{n}: {r['batch'].clean.shape[0]} prompts × {r['batch'].clean.shape[1]} tokens, "
                      f"{r['n_edges']} edges" for n, r in results.items())
    text = f"{header}\n\n{sizes}; EAP-IG with {args.ig_steps} steps.\n\n{table(results)}\n"
    args.out.write_text(text)
    raw = {n: {label: {"fractions": c.fractions, "faithfulness": c.faithfulness, "n_edges": c.n_edges,
                       "clean": c.clean, "corrupt": c.corrupt, "seconds": r["seconds"][label]}
               for label, c in r["curves"].items()} for n, r in results.items()}
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    print(text)


if __name__ == "__main__":
    main()
