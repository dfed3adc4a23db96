"""How well does attribution patching predict activation patching on SmolLM2-135M-Instruct, GIM vs plain gradients?

For the shipped IOI and factual-recall sets (counterfactual corruptions), on examples whose clean prompt the
model completes correctly (top-1 = answer) and whose corrupt prompt has the same token length:

* per head (30 layers × 9 heads) and per MLP layer, AtP with GIM gradients and with plain gradients
  (``gim_tl.patching.atp``), and the true effect of patching the corrupt activation into the clean run
  (``gim_tl.patching.activation_patching``), all as the mean over examples of the change in the logit
  difference (IOI: answer − distractor; factual: answer − corrupt answer);
* Pearson and Spearman correlation of each AtP variant with the true effects, and the time of each.

Writes ``benchmarks/results_atp.md`` and ``benchmarks/atp_scatter.png`` and prints the table.
Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/atp_correlation.py [--n-examples 32] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from _common import correct_pairs, cpu_model  # noqa: E402
from scipy import stats  # noqa: E402

from gim_tl import PRESET_LABELS, GIMHookSet  # noqa: E402
from gim_tl.data import load_factual_recall, load_ioi  # noqa: E402
from gim_tl.models import load_model  # noqa: E402
from gim_tl.patching import activation_patching, atp, logit_diff_metric  # noqa: E402

HERE = Path(__file__).resolve().parent
METHODS = ("AtP-GIM", "AtP (plain)")
#: Single-rule and two-rule presets, to see which GIM rule moves the correlation (AtP is cheap).
ABLATIONS = ("freeze_norm", "grad_norm", "tsg", "freeze_norm+grad_norm")
COMPONENTS = {"attn_head": "per head", "mlp_out": "per MLP layer"}


@dataclass
class Item:
    clean: list[int]
    corrupt: list[int]
    answer: int
    wrong: int


@dataclass
class SetResult:
    name: str
    n_candidates: int
    n_used: int
    scores: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)   # method -> component -> mean
    seconds: dict[str, float] = field(default_factory=dict)
    lengths: dict[int, int] = field(default_factory=dict)   # token length -> number of examples


def eligible(model, rows, wrong_field: str, limit: int) -> tuple[list[Item], int]:
    """Examples with equal clean/corrupt token length, one-token answers and a correct clean top-1, in file order."""
    pairs, n_candidates = correct_pairs(model, rows, wrong_field)
    return [Item(*p) for p in pairs[:limit]], n_candidates


def batches(items: list[Item], size: int) -> list[list[Item]]:
    """Equal-length batches (no padding needed), at most ``size`` prompts each."""
    out = []
    for length in sorted({len(i.clean) for i in items}):
        group = [i for i in items if len(i.clean) == length]
        out += [group[k:k + size] for k in range(0, len(group), size)]
    return out


def run_set(model, name: str, items: list[Item], n_candidates: int, batch_size: int, progress: bool) -> SetResult:
    result = SetResult(name, n_candidates, len(items))
    for item in items:
        result.lengths[len(item.clean)] = result.lengths.get(len(item.clean), 0) + 1
    totals: dict[str, dict[str, torch.Tensor]] = {}
    seconds = dict.fromkeys(("AtP-GIM", "AtP (plain)", "activation patching"), 0.0)
    hook_sets = {"AtP-GIM": GIMHookSet(), "AtP (plain)": GIMHookSet.preset("plain")}
    hook_sets |= {f"AtP ({PRESET_LABELS[p]})": GIMHookSet.preset(p) for p in ABLATIONS}

    def add(method: str, component: str, scores: torch.Tensor, weight: int) -> None:
        totals.setdefault(method, {})
        totals[method][component] = totals[method].get(component, 0) + weight * scores

    for batch in batches(items, batch_size):
        clean = torch.tensor([i.clean for i in batch])
        corrupt = torch.tensor([i.corrupt for i in batch])
        metric = logit_diff_metric([i.answer for i in batch], [i.wrong for i in batch])
        for method, hook_set in hook_sets.items():
            start = time.perf_counter()
            res = atp(model, clean, corrupt, metric, tuple(COMPONENTS), hook_set=hook_set)
            seconds[method] = seconds.get(method, 0.0) + time.perf_counter() - start
            for component in COMPONENTS:
                add(method, component, res[component].scores, len(batch))
        for component in COMPONENTS:
            start = time.perf_counter()
            truth = activation_patching(model, clean, corrupt, metric, component, progress=progress)
            seconds["activation patching"] += time.perf_counter() - start
            add("activation patching", component, truth.scores, len(batch))
    result.scores = {m: {c: s / len(items) for c, s in per.items()} for m, per in totals.items()}
    result.seconds = seconds
    return result


def correlations(result: SetResult) -> dict[tuple[str, str], tuple[float, float]]:
    """(component, method) -> (Pearson r, Spearman ρ) of the AtP scores with the true effects."""
    out = {}
    for component in COMPONENTS:
        truth = result.scores["activation patching"][component].flatten().numpy()
        for method in result.scores:
            if method == "activation patching":
                continue
            est = result.scores[method][component].flatten().numpy()
            out[(component, method)] = (float(stats.pearsonr(est, truth)[0]), float(stats.spearmanr(est, truth)[0]))
    return out


def markdown_table(results: list[SetResult]) -> str:
    lines = ["| prompt set | n | component | method | Pearson r | Spearman ρ |", "|---|---|---|---|---|---|"]
    for result in results:
        corr = correlations(result)
        for component, label in COMPONENTS.items():
            for method in METHODS:
                r, rho = corr[(component, method)]
                lines.append(f"| {result.name} | {result.n_used} | {label} | {method} | {r:.3f} | {rho:.3f} |")
    return "\n".join(lines)


def ablation_table(results: list[SetResult]) -> str:
    """Spearman ρ (Pearson r) of every preset, one column per prompt set and component."""
    cols = [(r, c) for r in results for c in COMPONENTS]
    head = "| gradient | " + " | ".join(f"{r.name}, {COMPONENTS[c]}" for r, c in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    corr = {r.name: correlations(r) for r in results}
    for method in [m for m in results[0].scores if m != "activation patching"]:
        cells = [f"{corr[r.name][(c, method)][1]:.3f} ({corr[r.name][(c, method)][0]:.3f})" for r, c in cols]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timing_table(results: list[SetResult]) -> str:
    lines = ["| prompt set | AtP-GIM (s) | AtP plain (s) | activation patching (s) | speed-up of AtP-GIM |",
             "|---|---|---|---|---|"]
    for r in results:
        s = r.seconds
        lines.append(f"| {r.name} | {s['AtP-GIM']:.1f} | {s['AtP (plain)']:.1f} | {s['activation patching']:.1f} | "
                     f"{s['activation patching'] / s['AtP-GIM']:.0f}× |")
    return "\n".join(lines)


def outcome(results: list[SetResult]) -> str:
    wins, total, lines = 0, 0, []
    for result in results:
        corr = correlations(result)
        for component, label in COMPONENTS.items():
            (g_r, g_rho), (p_r, p_rho) = corr[(component, "AtP-GIM")], corr[(component, "AtP (plain)")]
            for stat, g, p in (("Pearson", g_r, p_r), ("Spearman", g_rho, p_rho)):
                total += 1
                wins += g > p
                lines.append(f"{result.name}, {label}, {stat}: GIM {g:.3f} vs plain {p:.3f} "
                             f"({'GIM higher' if g > p else 'plain higher or equal'})")
    return f"GIM above plain in {wins} of {total} comparisons.\n\n" + "\n".join(f"- {x}" for x in lines)


def scatter(results: list[SetResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), len(COMPONENTS), figsize=(10, 4.5 * len(results)), squeeze=False)
    for row, result in zip(axes, results, strict=True):
        corr = correlations(result)
        for ax, (component, label) in zip(row, COMPONENTS.items(), strict=True):
            truth = result.scores["activation patching"][component].flatten()
            for method, color in zip(METHODS, ("tab:orange", "tab:blue"), strict=True):
                est = result.scores[method][component].flatten()
                r, rho = corr[(component, method)]
                ax.scatter(truth, est, s=12 if component == "attn_head" else 25, alpha=0.6, color=color,
                           label=f"{method}: r={r:.2f}, ρ={rho:.2f}")
            lim = float(truth.abs().max())
            ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls="--", label="y = x")
            ax.axhline(0, color="lightgrey", lw=0.6)
            ax.axvline(0, color="lightgrey", lw=0.6)
            ax.set_xlabel("true effect (activation patching, Δ logit diff)")
            ax.set_ylabel("AtP estimate")
            ax.set_title(f"{result.name}: {label} (n = {result.n_used})")
            ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: attribution patching vs activation patching")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-examples", type=int, default=32, help="examples per prompt set (first eligible ones)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per AtP / patching batch")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=HERE / "results_atp.md")
    parser.add_argument("--plot", type=Path, default=HERE / "atp_scatter.png")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    start = time.perf_counter()
    model = load_model()
    load_s = time.perf_counter() - start
    results = []
    for name, rows, wrong in (("IOI", load_ioi(), "distractor"), ("factual recall", load_factual_recall(),
                                                                     "corrupt_answer")):
        items, n_candidates = eligible(model, rows, wrong, args.n_examples)
        print(f"{name}: {len(rows)} rows, {n_candidates} with equal lengths and one-token answers, using {len(items)}",
              flush=True)
        results.append(run_set(model, name, items, n_candidates, args.batch_size, not args.no_progress))
    total_s = time.perf_counter() - start

    table, timing, ablation = markdown_table(results), timing_table(results), ablation_table(results)
    print("\n" + table + "\n\n" + ablation + "\n\n" + timing + "\n\n" + outcome(results))
    scatter(results, args.plot)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    used = "\n".join(f"{r.name}: {r.n_used} of {r.n_candidates} pairs; tokens per prompt (length: count) "
                     f"{dict(sorted(r.lengths.items()))}." for r in results)
    text = f"""# Attribution patching vs activation patching (SmolLM2-135M-Instruct)

Generated by `benchmarks/atp_correlation.py` on {datetime.date.today().isoformat()}.

**Device:** CPU, {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} with {args.threads} thread(s);
load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (the machine was shared with other jobs, so the
times below are inflated; their ratio is what matters). Model load {load_s:.0f} s; whole run {total_s / 60:.1f} min.

**Settings:** SmolLM2-135M-Instruct (Q4_1 GGUF de-quantized to fp32), `TransformerBridge`. Prompt sets shipped in
`gim_tl.data`: IOI (ABC counterfactual; metric = logit(answer) − logit(distractor)) and factual recall (subject-swapped
counterfactual; metric = logit(answer) − logit(corrupt answer)). Used: the first {args.n_examples} examples (file order)
whose clean prompt the model completes with the answer (top-1) and whose corrupt prompt has the same token length
(all pairs do), in equal-length batches of ≤ {args.batch_size} (no padding). Scores are means over examples.
{used}
AtP = Σ_pos (corrupt − clean activation) · gradient of the metric at the clean run, at `attn.hook_z` per head and
`hook_mlp_out` per layer; AtP-GIM uses `GIMHookSet()` (TSG T = 2, norm freeze, gradient normalization), plain AtP
`GIMHookSet.preset("plain")`. Ground truth: activation patching of the same activations (one head's z at all positions,
one layer's MLP output at all positions) from the corrupt run into the clean run: 270 + 30 forward passes per batch.

## Correlation with the true effects

{table}

## Which rule moves it: Spearman ρ (Pearson r) for each GIM preset

{ablation}

## Outcome

{outcome(results)}

## Time (summed over batches)

{timing}

![scatter](atp_scatter.png)
"""
    args.out.write_text(text)
    print(f"\nwrote {args.out} and {args.plot} ({total_s / 60:.1f} min)")


if __name__ == "__main__":
    main()
