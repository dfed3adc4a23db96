"""Faithfulness benchmark on SmolLM2-135M-Instruct (CPU): does GIM beat gradient × input and IG?

Runs every attribution method on four shipped data sets, scores the rankings with the paper's
comprehensiveness / sufficiency (``gim_tl.evaluation``), three ways (raw logit as in the paper,
log-probability, logit difference), against a random ranking, with paired sign tests against
plain gradient × input; then the attention self-repair analysis (``gim_tl.self_repair``).
Writes ``benchmarks/results_faithfulness.md`` and PNGs under ``benchmarks/figures/``.

    python benchmarks/faithfulness.py            # full run: ~25 min on 2 quiet CPU cores
    python benchmarks/faithfulness.py --quick    # smoke run, 3 examples per data set

Default sizes (all flags): 32 examples per short data set with IG at 50 steps (both IG variants);
16 per chat data set with IG at 16 steps, first position kept (50 steps × 134-token prompts would cost
more than the rest of the run on CPU); the paper's full-prompt scope on 5 sentiment examples with GxI,
LN-freeze GxI, GIM and IG; 3 random permutations (1 in the full scope); self-repair on 4 short / 2 chat
examples per data set.

Data sets:
* ``sentiment`` / ``fact_check``: 2-shot chat prompts, target "Yes" (true positives) with contrast
  "No"; if too few true positives, true negatives (target "No", contrast "Yes") fill up, and the
  report says how many (SmolLM2 answers "No" to every fact-check statement, zero- or few-shot).
  Rankings are scored over the evaluated text only ("text" scope) and, for sentiment, also over all
  positions but the first and last (the paper's "full" scope; each example costs ~55 forwards of the
  whole prompt per method).
* ``factual_recall`` / ``ioi``: short completions the model gets right (top-1 = answer); contrast is
  the counterfactual answer / the IOI distractor.
Every method explains the raw target logit at the last position (the paper's choice).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from _common import cpu_model  # noqa: E402

from gim_tl import data as gdata  # noqa: E402
from gim_tl import evaluation as ev  # noqa: E402
from gim_tl import self_repair as sr  # noqa: E402
from gim_tl.attribution import attribute_tokens  # noqa: E402
from gim_tl.config import PRESET_LABELS, PRESETS  # noqa: E402
from gim_tl.models import load_model, tokens_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRESET_NAMES = list(PRESETS)
LABELS = {**PRESET_LABELS, "plain": "GxI (plain autograd = grad_x_input)", "freeze_norm": "+ LN freeze (≈ paper's GxI)",
          "ig": "IG (first pos. kept)", "ig_all": "IG (all positions)", "random": "Random"}
SCORING_NAMES = {"logit": "raw logit (paper)", "logprob": "log-prob (nats, unnormalized)",
                 "logit_diff": "logit diff (normalized)"}


@dataclass
class TaskSet:
    """The selected examples of one data set."""

    name: str
    prompts: list[str]
    target_ids: list[int]
    contrast_ids: list[int]
    texts: list[str] | None = None          # chat tasks: the evaluated text inside the prompt
    kinds: list[str] = field(default_factory=list)   # "TP" / "TN" / "correct"
    screened: dict = field(default_factory=dict)     # accuracy counts from screening


# ---------------------------------------------------------------------------------------------
# Screening and selection
# ---------------------------------------------------------------------------------------------


def token_lists(tok, prompts: list[str]) -> list[list[int]]:
    return [list(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]


def last_logits_shared_prefix(model, seqs: list[list[int]], batch: int = 16) -> torch.Tensor:
    """Last-token logits of many prompts that share a long prefix: the prefix runs once (KV cache), the
    suffixes run right-padded in batches (causal attention: padding after a row's end cannot reach it)."""
    hf = model.original_model
    prefix = 0
    while all(len(s) > prefix + 1 for s in seqs) and len({s[prefix] for s in seqs}) == 1:
        prefix += 1
    out = []
    with torch.no_grad():
        past = hf(input_ids=torch.tensor([seqs[0][:prefix]]), use_cache=True).past_key_values if prefix else None
        for start in range(0, len(seqs), batch):
            rows = [s[prefix:] for s in seqs[start:start + batch]]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
            kw = {}
            if past is not None:
                p = copy.deepcopy(past)
                p.batch_repeat_interleave(len(rows))
                kw["past_key_values"] = p
            logits = hf(input_ids=ids, use_cache=past is not None, **kw).logits
            out.append(logits[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])])
    return torch.cat(out)


def select_chat(model, name: str, n: int, seed: int, *, chunk: int = 16, min_screen: int = 48) -> TaskSet:
    """Screen shuffled rows with the 2-shot prompt (and, on the same rows, zero-shot for the record) in
    chunks until ``n`` true positives are found (or, after ``min_screen`` rows, until true positives and
    true negatives together reach ``n``); true negatives fill up when true positives are too few."""
    tok = model.tokenizer
    rows = gdata.load_sentiment() if name == "sentiment" else gdata.load_fact_check()
    question = gdata.SENTIMENT_QUESTION if name == "sentiment" else gdata.FACT_CHECK_QUESTION
    shots = (gdata.SENTIMENT_SHOTS if name == "sentiment" else gdata.FACT_CHECK_SHOTS)[:2]
    yes, no = (int(tok(a, add_special_tokens=False)["input_ids"][0]) for a in gdata.YES_NO_ANSWERS)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    rows = [rows[i] for i in order]
    counts = {label: dict(n=0, positives=0, tp=0, tn=0, predicted_yes=0) for label in ("zero_shot", "two_shot")}
    tps: list[int] = []
    tns: list[int] = []
    prompts: list[str] = []
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        for label, k in (("zero_shot", ()), ("two_shot", shots)):
            ps = [gdata.chat_yes_no_prompt(tok, r.text, question, k) for r in part]
            logits = last_logits_shared_prefix(model, token_lists(tok, ps))
            pred_yes = (logits[:, yes] > logits[:, no]).tolist()
            c = counts[label]
            c["n"] += len(part)
            c["positives"] += sum(r.is_yes for r in part)
            c["predicted_yes"] += sum(pred_yes)
            c["tp"] += sum(p and r.is_yes for p, r in zip(pred_yes, part, strict=True))
            c["tn"] += sum((not p) and (not r.is_yes) for p, r in zip(pred_yes, part, strict=True))
            if label == "two_shot":
                prompts += ps
                tps += [start + i for i, (p, r) in enumerate(zip(pred_yes, part, strict=True)) if p and r.is_yes]
                tns += [start + i for i, (p, r) in enumerate(zip(pred_yes, part, strict=True))
                        if (not p) and not r.is_yes]
        if len(tps) >= n or (start + chunk >= min_screen and len(tps) + len(tns) >= n):
            break
    for c in counts.values():
        c["accuracy"] = (c["tp"] + c["tn"]) / max(c["n"], 1)
    picks = [(i, "TP") for i in tps[:n]]
    if len(picks) < n:
        picks += [(i, "TN") for i in tns[: n - len(picks)]]
    return TaskSet(name, [prompts[i] for i, _ in picks],
                   [yes if k == "TP" else no for _, k in picks], [no if k == "TP" else yes for _, k in picks],
                   texts=[rows[i].text for i, _ in picks], kinds=[k for _, k in picks], screened=counts)


def select_completion(model, name: str, n: int, seed: int) -> TaskSet:
    tok = model.tokenizer
    rows = gdata.load_factual_recall() if name == "factual_recall" else gdata.load_ioi()
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    rows = [rows[i] for i in order]
    prompts = [r.prompt for r in rows]
    answers = [int(tok(r.answer, add_special_tokens=False)["input_ids"][0]) for r in rows]
    contrast_str = [r.corrupt_answer if name == "factual_recall" else r.distractor for r in rows]
    contrasts = [int(tok(c, add_special_tokens=False)["input_ids"][0]) for c in contrast_str]
    tokens, mask = tokens_for(model, prompts)
    with torch.no_grad():
        logits = model.original_model(input_ids=tokens, attention_mask=mask, logits_to_keep=1).logits[:, -1]
    correct = (logits.argmax(-1) == torch.tensor(answers)).tolist()
    picks = [i for i, c in enumerate(correct) if c][:n]
    return TaskSet(name, [prompts[i] for i in picks], [answers[i] for i in picks], [contrasts[i] for i in picks],
                   kinds=["correct"] * len(picks),
                   screened={"top1": dict(n=len(rows), correct=sum(correct), accuracy=sum(correct) / len(rows))})


def text_mask(tok, prompt: str, text: str, n_tokens: int) -> torch.Tensor:
    """Token positions of ``text`` (its last occurrence) inside ``prompt``."""
    start, end = gdata.text_char_span(prompt, text)
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) != n_tokens:
        raise RuntimeError("offset tokenization differs from the attribution's tokens")
    return torch.tensor([a < end and b > start for a, b in enc["offset_mapping"]])


# ---------------------------------------------------------------------------------------------
# Attribution and evaluation
# ---------------------------------------------------------------------------------------------


def attribute_all(model, ts: TaskSet, methods: list[str], *, ig_steps: int, chunk: int, log) -> dict:
    """``{method: TokenAttribution-like (token_ids, mask, scores)}`` for every method, in chunks."""
    out = {}
    for m in methods:
        t0 = time.time()
        parts = []
        for s in range(0, len(ts.prompts), chunk):
            kw = dict(target=ts.target_ids[s:s + chunk])
            if m in ("ig", "ig_all"):
                kw.update(method="integrated_gradients", ig_steps=ig_steps, ig_keep_first=(m == "ig"),
                          ig_batch_size=16, progress=False)
            else:
                kw.update(method=m)
            parts.append(attribute_tokens(model, ts.prompts[s:s + chunk], **kw))
        out[m] = parts
        log(f"  attribution {ts.name:15s} {m:22s} {time.time() - t0:7.1f}s")
    return out


def ig_completeness(model_fn, parts, keep_first: bool, baseline_id: int) -> list[float]:
    """Per example ``|Σ_i score_i − (f(x) − f(x′))| / |f(x) − f(x′)|`` of an IG attribution: how far the
    Riemann sum is from the completeness identity. ``x′`` is the all-space input (position 0 kept if
    ``keep_first``); ``f`` the explained target logit."""
    out = []
    for p in parts:
        for i in range(len(p)):
            ids = p.token_ids[i][p.mask[i]]
            base = torch.full_like(ids, baseline_id)
            if keep_first:
                base[0] = ids[0]
            logits = model_fn(torch.stack([ids, base]))
            t = int(p.target_ids[i])
            gap = float(logits[0, t] - logits[1, t])
            out.append(abs(float(p.scores[i].sum()) - gap) / max(abs(gap), 1e-9))
    return out


def stack_parts(parts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate chunked attributions (each chunk left-padded to its own width)."""
    width = max(p.token_ids.shape[1] for p in parts)

    def pad(x, value):
        return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    return (torch.cat([pad(p.token_ids, 0) for p in parts]), torch.cat([pad(p.mask.long(), 0) for p in parts]),
            torch.cat([pad(p.scores, 0.0) for p in parts]))


def evaluate_all(model_fn, ts: TaskSet, attrs: dict, *, baseline_id: int, scope: str, n_examples: int,
                 restrict, n_random: int, seed: int, cache: dict, log, methods: list[str] | None = None) -> dict:
    results = {}
    if methods is not None:
        attrs = {m: a for m, a in attrs.items() if m in methods}
    first = next(iter(attrs.values()))
    tokens, mask, _ = stack_parts(first)
    tokens, mask = tokens[:n_examples], mask[:n_examples]
    restrict = None if restrict is None else restrict[:n_examples]
    common = dict(baseline_id=baseline_id, attention_mask=mask, contrast_ids=ts.contrast_ids[:n_examples],
                  scorings=("logit", "logprob", "logit_diff"), restrict_to=restrict, cache=cache, batch_size=28)
    for m, parts in attrs.items():
        t0 = time.time()
        toks_m, mask_m, scores = stack_parts(parts)
        if not torch.equal(toks_m[:n_examples], tokens):
            raise RuntimeError(f"{m}: tokens differ between methods")
        results[m] = ev.evaluate_faithfulness(model_fn, tokens, scores[:n_examples], ts.target_ids[:n_examples],
                                              desc=f"{ts.name}/{scope}/{m}", **common)
        log(f"  evaluate    {ts.name:15s} {scope:5s} {m:22s} {time.time() - t0:7.1f}s")
    t0 = time.time()
    results["random"] = ev.random_baseline(model_fn, tokens, ts.target_ids[:n_examples], n_permutations=n_random,
                                           seed=seed, desc=f"{ts.name}/{scope}/random", **common)
    log(f"  evaluate    {ts.name:15s} {scope:5s} {'random':22s} {time.time() - t0:7.1f}s")
    return results


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def fmt_ci(ci: ev.MeanCI) -> str:
    if math.isnan(ci.mean):
        return "–"
    if math.isnan(ci.low):
        return f"{ci.mean:.3f}"
    return f"{ci.mean:.3f} ± {(ci.high - ci.low) / 2:.3f}"


def fmt_win(pc: ev.PairedComparison) -> str:
    if pc.n == 0:
        return "–"
    star = "*" if pc.p_value < 0.05 else ""
    return f"{pc.win_rate:.2f} ({pc.wins}/{pc.losses}/{pc.ties}, p={pc.p_value:.2g}){star}"


def table_means(res: dict) -> list[str]:
    scorings = list(next(iter(res.values())).keys())
    head = "| method | " + " | ".join(f"{s} comp ↑ | {s} suff ↓" for s in scorings) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(scorings))]
    for m, r in res.items():
        cells = []
        for s in scorings:
            cells += [fmt_ci(ev.mean_ci(r[s].comprehensiveness)), fmt_ci(ev.mean_ci(r[s].sufficiency))]
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return lines


def table_wins(res: dict, reference: str, methods: list[str]) -> list[str]:
    scorings = list(next(iter(res.values())).keys())
    head = "| method vs " + LABELS.get(reference, reference) + " | " + " | ".join(
        f"{s}: comp win | {s}: suff win" for s in scorings) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(scorings))]
    for m in methods:
        if m == reference or m not in res:
            continue
        cells = []
        for s in scorings:
            cells.append(fmt_win(ev.paired_comparison(res[m][s].comprehensiveness, res[reference][s].comprehensiveness,
                                                      higher_is_better=True)))
            cells.append(fmt_win(ev.paired_comparison(res[m][s].sufficiency, res[reference][s].sufficiency,
                                                      higher_is_better=False)))
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return lines


def bar_figure(res: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scorings = list(next(iter(res.values())).keys())
    methods = list(res)
    fig, axes = plt.subplots(len(scorings), 2, figsize=(12, 2.8 * len(scorings)), squeeze=False)
    colors = ["#888888" if m in ("random",) else "#d62728" if m == "gim" else
              "#1f77b4" if m in ("ig", "ig_all") else "#2ca02c" for m in methods]
    for row, s in enumerate(scorings):
        for col, (metric, arrow) in enumerate((("comprehensiveness", "↑"), ("sufficiency", "↓"))):
            ax = axes[row, col]
            cis = [ev.mean_ci(getattr(res[m][s], metric)) for m in methods]
            means = [c.mean for c in cis]
            errs = [0 if math.isnan(c.low) else (c.high - c.low) / 2 for c in cis]
            ax.bar(range(len(methods)), means, yerr=errs, color=colors, capsize=2)
            ax.set_xticks(range(len(methods)))
            ax.set_xticklabels([m.replace("freeze_norm", "LNfrz").replace("grad_norm", "gnorm") for m in methods],
                               rotation=45, ha="right", fontsize=7)
            ax.set_title(f"{metric} {arrow} — {SCORING_NAMES[s]}", fontsize=9)
            ax.axhline(0, color="black", lw=0.5)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 examples per data set, IG 8 steps")
    ap.add_argument("--n-short", type=int, default=32, help="examples per short data set (factual, IOI)")
    ap.add_argument("--n-chat", type=int, default=16, help="examples per chat data set (text scope)")
    ap.add_argument("--n-chat-full", type=int, default=5, help="chat examples also scored in the full scope")
    ap.add_argument("--ig-steps", type=int, default=50)
    ap.add_argument("--ig-steps-chat", type=int, default=16, help="IG steps on the long chat prompts")
    ap.add_argument("--ig-all-datasets", default="factual_recall,ioi",
                    help="data sets that also get the all-positions IG variant")
    ap.add_argument("--full-methods", default="plain,freeze_norm,gim,ig",
                    help="methods scored in the chat 'full' scope (plus random)")
    ap.add_argument("--full-datasets", default="sentiment",
                    help="chat data sets also scored in the 'full' scope (fact_check: the model says No to all)")
    ap.add_argument("--random-perms", type=int, default=3)
    ap.add_argument("--random-perms-full", type=int, default=1, help="random permutations in the chat 'full' scope")
    ap.add_argument("--self-repair-examples", type=int, default=4, help="examples per short data set")
    ap.add_argument("--self-repair-examples-chat", type=int, default=2, help="examples per chat data set")
    ap.add_argument("--datasets", default="factual_recall,ioi,sentiment,fact_check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results_faithfulness.md"))
    ap.add_argument("--figures", default=str(ROOT / "benchmarks" / "figures"))
    ap.add_argument("--raw", default="/tmp/faithfulness_raw.json", help="per-example results as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_short, args.n_chat, args.n_chat_full = 3, 3, 2
        args.ig_steps, args.ig_steps_chat, args.random_perms, args.self_repair_examples = 8, 4, 1, 1
        args.self_repair_examples_chat = 1
        args.ig_all_datasets = "factual_recall"
    if args.threads:
        torch.set_num_threads(args.threads)
    # Subnormal floats (tiny attention probabilities next to SmolLM2's attention sink, and IG paths that
    # interpolate its massive first-position activations) are very slow on x86 CPUs; flushing them to zero
    # changes values below 1.2e-38 only and made forwards ~2x (all-positions IG ~10x) faster here.
    torch.set_flush_denormal(True)
    warnings.filterwarnings("ignore")
    figdir = Path(args.figures)
    figdir.mkdir(parents=True, exist_ok=True)

    t_start = time.time()
    timings: dict[str, float] = {}
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    t0 = time.time()
    model = load_model()
    tok = model.tokenizer
    timings["load model"] = time.time() - t0
    baseline_id = ev.space_token_id(tok)
    model_fn = ev.PrefixCachedLogits(model, min_prefix=16)
    log(f"model loaded in {timings['load model']:.1f}s; threads={torch.get_num_threads()}")

    datasets = [d for d in args.datasets.split(",") if d]
    tasks: dict[str, TaskSet] = {}
    t0 = time.time()
    for d in datasets:
        if d in ("sentiment", "fact_check"):
            tasks[d] = select_chat(model, d, args.n_chat, args.seed)
        else:
            tasks[d] = select_completion(model, d, args.n_short, args.seed)
        counts = {k: tasks[d].kinds.count(k) for k in set(tasks[d].kinds)}
        log(f"selected {d}: {len(tasks[d].prompts)} examples {counts} screening {tasks[d].screened}")
    timings["screening"] = time.time() - t0

    all_results: dict[str, dict] = {}
    cache: dict = {}
    gxi_check = {}
    ig_check: dict[str, tuple[float, float]] = {}
    for d, ts in tasks.items():
        if not ts.prompts:
            log(f"{d}: no examples selected, skipped")
            continue
        chat = ts.texts is not None
        methods = PRESET_NAMES + ["ig"] + (["ig_all"] if d in args.ig_all_datasets.split(",") else [])
        t0 = time.time()
        attrs = attribute_all(model, ts, methods, ig_steps=args.ig_steps_chat if chat else args.ig_steps,
                              chunk=8, log=log)
        # grad_x_input is plain autograd: check it equals the "plain" preset on the first chunk
        gxi = attribute_tokens(model, ts.prompts[:8], target=ts.target_ids[:8], method="grad_x_input")
        gxi_check[d] = float((gxi.scores - attrs["plain"][0].scores).abs().max())
        for m in ("ig", "ig_all"):
            if m in attrs:
                errs = torch.tensor(ig_completeness(model_fn, attrs[m], m == "ig", baseline_id))
                ig_check[f"{d}/{m}"] = (float(errs.median()), float(errs.max()))
                log(f"  IG completeness {d}/{m}: median rel. error {ig_check[f'{d}/{m}'][0]:.3f}, "
                    f"max {ig_check[f'{d}/{m}'][1]:.3f}")
        timings[f"attribution {d}"] = time.time() - t0
        tokens, mask, _ = stack_parts(attrs["plain"])
        scopes = []
        if chat:
            restrict = torch.zeros_like(mask, dtype=torch.bool)
            for i, (p, text) in enumerate(zip(ts.prompts, ts.texts, strict=True)):
                n_real = int(mask[i].sum())
                restrict[i, -n_real:] = text_mask(tok, p, text, n_real)
            scopes.append(("text", len(ts.prompts), restrict, None, args.random_perms))
            if args.n_chat_full > 0 and d in args.full_datasets.split(","):
                scopes.append(("full", min(args.n_chat_full, len(ts.prompts)), None, args.full_methods.split(","),
                               args.random_perms_full))
        else:
            scopes.append(("full", len(ts.prompts), None, None, args.random_perms))
        for scope, n_ex, restrict, only, n_random in scopes:
            t0 = time.time()
            all_results[f"{d}/{scope}"] = evaluate_all(model_fn, ts, attrs, baseline_id=baseline_id, scope=scope,
                                                       n_examples=n_ex, restrict=restrict, methods=only,
                                                       n_random=n_random, seed=args.seed, cache=cache, log=log)
            timings[f"evaluation {d}/{scope}"] = time.time() - t0

    # ---- self-repair -------------------------------------------------------------------------
    t0 = time.time()
    sr_rows = {}
    sr_summaries = {}
    for d, ts in tasks.items():
        k = min(args.self_repair_examples_chat if ts.texts is not None else args.self_repair_examples,
                len(ts.prompts))
        if k == 0:
            continue
        seqs = [torch.tensor(ids) for ids in token_lists(tok, ts.prompts[:k])]
        eff = sr.self_repair_rows(model, seqs, ts.target_ids[:k], readout="grad")
        sel = sr.select_rows(eff)
        sr_rows[d] = (eff, sel)
        sr_summaries[d] = sr.summarize(eff, sel)
        sr.plot_self_repair(eff, sel, str(figdir / f"self_repair_{d}.png"),
                            title=f"SmolLM2 self-repair, {d} ({k} examples, readout g_z, {int(sel.sum())} rows)")
        log(f"self-repair {d}: {sr_summaries[d]}")
    if sr_rows:
        eff_all = sr.RowEffects.concat([e for e, _ in sr_rows.values()])
        sel_all = torch.cat([s for _, s in sr_rows.values()])
        sr_summaries["all"] = sr.summarize(eff_all, sel_all)
        # the paper's readout (z) with its absolute threshold 1, on the first data set's examples
        d0 = next(iter(sr_rows))
        k = min(args.self_repair_examples, len(tasks[d0].prompts))
        seqs = [torch.tensor(ids) for ids in token_lists(tok, tasks[d0].prompts[:k])]
        eff_z = sr.self_repair_rows(model, seqs, tasks[d0].target_ids[:k], readout="z")
        sr_summaries[f"{d0} (readout z, τ=1)"] = sr.summarize(eff_z, threshold=1.0)
    timings["self-repair"] = time.time() - t0

    # ---- figures -----------------------------------------------------------------------------
    for key, res in all_results.items():
        bar_figure(res, f"SmolLM2-135M-Instruct — {key} (mean ± 95% t-CI)",
                   figdir / f"faithfulness_{key.replace('/', '_')}.png")

    timings["total"] = time.time() - t_start
    write_report(args, tasks, all_results, sr_summaries, timings, gxi_check, ig_check, log_lines)
    raw = {key: {m: {s: dict(comp=r.comprehensiveness.tolist(), suff=r.sufficiency.tolist(), clean=r.clean.tolist(),
                             n_eligible=r.n_eligible.tolist()) for s, r in byscore.items()}
                 for m, byscore in res.items()} for key, res in all_results.items()}
    Path(args.raw).write_text(json.dumps(raw))
    log(f"done in {timings['total']:.0f}s; report: {args.out}")
    return 0


def headline(all_results: dict) -> list[str]:
    """GIM against GxI (plain), LN-freeze GxI and IG, per data set/scope/scoring."""
    lines = ["| data set / scope | scoring | GIM vs GxI: comp | GIM vs GxI: suff | GIM vs IG: comp | GIM vs IG: suff |"
             " GIM vs random: comp | GIM vs random: suff |", "|---|---|---|---|---|---|---|---|"]
    for key, res in all_results.items():
        for s in next(iter(res.values())):
            cells = []
            for ref in ("plain", "ig", "random"):
                if ref not in res:
                    cells += ["–", "–"]
                    continue
                cells.append(fmt_win(ev.paired_comparison(res["gim"][s].comprehensiveness,
                                                          res[ref][s].comprehensiveness, higher_is_better=True)))
                cells.append(fmt_win(ev.paired_comparison(res["gim"][s].sufficiency, res[ref][s].sufficiency,
                                                          higher_is_better=False)))
            lines.append(f"| {key} | {s} | " + " | ".join(cells) + " |")
    return lines


def write_report(args, tasks, all_results, sr_summaries, timings, gxi_check, ig_check, log_lines) -> None:
    out: list[str] = []
    now = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    out += [f"# Faithfulness of GIM on SmolLM2-135M-Instruct ({'QUICK smoke run' if args.quick else 'full run'})", "",
            f"*Generated by `benchmarks/faithfulness.py` on {now}; device: CPU ({cpu_model()}), "
            f"{torch.get_num_threads()} torch threads, shared with other jobs; torch {torch.__version__}, "
            f"Python {sys.version.split()[0]}. Total runtime {timings['total'] / 60:.1f} min.*", ""]
    out += ["## Setup", "",
            "- Model: SmolLM2-135M-Instruct (GGUF Q4_1 de-quantized to fp32) as a TL `TransformerBridge`.",
            "- Explained scalar: raw logit of the target token at the last position (the paper's choice), "
            "space-token baseline for every gradient × input method.",
            "- Methods: the eight GIM ablation presets (`gim_tl.config.PRESETS`), integrated gradients "
            f"(midpoint rule, {args.ig_steps} steps on short prompts, {args.ig_steps_chat} on chat prompts; "
            "'first pos. kept' holds position 0 at its real embedding, 'all positions' interpolates it too "
            f"and is run on {args.ig_all_datasets.replace(',', ', ')} only), and a random ranking "
            f"(mean over {args.random_perms} seeded permutations per example; {args.random_perms_full} in the "
            "chat 'full' scope).",
            "- **Which gradient × input**: the row 'GxI' is pure autograd (`method=\"plain\"`, identical to "
            "`\"grad_x_input\"`; checked: max |Δscore| = "
            + ", ".join(f"{d} {v:.1e}" for d, v in gxi_check.items())
            + "); its final norm is **not** frozen. The paper's GxI freezes the final norm only; the closest "
            "preset here is '+ LN freeze', which freezes every norm.",
            "- IG quality (completeness: |Σ scores − (f(x) − f(x′))| / |f(x) − f(x′)|, median / max over examples): "
            + ", ".join(f"{k} {a:.3f} / {b:.3f}" for k, (a, b) in ig_check.items()) + ".",
            "- Metrics (`gim_tl.evaluation`, `docs/evaluation.md`): comprehensiveness = mean over k = 1…50 of the "
            "score drop when the top-k ranked tokens become the space token (C_k = 0 for k > m); sufficiency = mean "
            "over ρ ∈ {.5,.8,.9,.95,.99} of the drop when the ⌊ρm⌋ lowest-ranked tokens are replaced. "
            "m = n − 2 (first and last token never ranked) in the 'full' scope; in the 'text' scope only the "
            "review/statement tokens of the final user turn are ranked and replaced.",
            "- Scorings: **logit** = raw target logit, drops divided by f(x) (examples with f(x) ≤ 0 dropped); "
            "**logprob** = target log-probability, drops in nats, *not* normalized (log-probs are negative); "
            "**logit_diff** = target − contrast logit (Yes−No / No−Yes, answer − counterfactual answer, "
            "IOI answer − distractor), divided by f(x) with the same guard.",
            "- Statistics: mean ± half-width of the 95% Student-t interval; win rate = (wins + ½ ties)/n "
            "per example, shown as `rate (wins/losses/ties, p)` with p from the two-sided exact sign test "
            "(ties dropped); * = p < 0.05. Comprehensiveness: higher wins; sufficiency: lower wins.",
            ""]
    out += ["## Data", "", "| data set | screening | explained examples |", "|---|---|---|"]
    for d, ts in tasks.items():
        kinds = ", ".join(f"{ts.kinds.count(k)} {k}" for k in ("TP", "TN", "correct") if ts.kinds.count(k))
        scr = "; ".join(f"{k}: " + ", ".join(f"{a}={b:.2f}" if isinstance(b, float) else f"{a}={b}"
                                            for a, b in v.items()) for k, v in ts.screened.items())
        out.append(f"| {d} | {scr} | {kinds or 'none'} |")
    out += ["", "Chat data sets use 2-shot prompts (`SENTIMENT_SHOTS[:2]` / `FACT_CHECK_SHOTS[:2]`) in SmolLM2's "
            "chat template (with its default system prompt); targets `Yes`/`No` without a leading space. "
            f"The 'full' scope ({args.full_datasets.replace(',', ', ')}) uses the first {args.n_chat_full} "
            "examples and the methods "
            f"{args.full_methods.replace(',', ', ')} only (each example needs 55 forwards of the whole prompt "
            "per method).", ""]

    out += ["## Headline: GIM against gradient × input, IG and random", ""] + headline(all_results) + [""]
    for key, res in all_results.items():
        n = len(next(iter(next(iter(res.values())).values())))
        dropped = {s: r.n_dropped for s, r in res["gim"].items() if r.n_dropped}
        out += [f"## {key} ({n} examples)", "", f"![{key}](figures/faithfulness_{key.replace('/', '_')}.png)", "",
                "Means ± 95% CI:", ""] + table_means(res)
        if dropped:
            out += ["", f"Dropped (f(x) ≤ 0): {dropped}"]
        out += ["", "Paired win rates against plain GxI:", ""]
        out += table_wins(res, "plain", [m for m in res if m != "plain"]) + [""]
    if sr_summaries:
        out += ["## Attention self-repair (`docs/evaluation.md`)", "",
                "Per head and query row: readout r = g_z (the gradient of the target logit at the head output), "
                "c_j = r·v_j, p_j = A_j c_j; rows with two keys above "
                f"{100 * sr.DEFAULT_REL_THRESHOLD:g}% of the example's largest single p are kept; keys j1, j2 "
                "are mean-ablated (score → the row's mean score) alone and together. "
                "I = (Δ12 − Δ1 − Δ2)/Δ12. Predictions of Δ12: Σ_{j1,j2} ∂F/∂S_j·(S_j − S̄) with the plain "
                "softmax gradient and with TSG (T = 2, no 1/T). The last row uses the research code's readout "
                "r = z_i with its absolute threshold 1.", "",
                "| examples | rows | selected | frac I > 0.1 | median I | Spearman(Δ12, plain) | "
                "Spearman(Δ12, TSG) | median plain/Δ12 | median TSG/Δ12 |", "|---|---|---|---|---|---|---|---|---|"]
        for d, s in sr_summaries.items():
            out.append(f"| {d} | {s.n_rows} | {s.n_selected} | {s.frac_interaction_above:.2f} | "
                       f"{s.median_interaction:.2f} | {s.spearman_plain:.3f} | {s.spearman_tsg:.3f} | "
                       f"{s.median_ratio_plain:.2f} | {s.median_ratio_tsg:.2f} |")
        out += [""] + [f"![self-repair {d}](figures/self_repair_{d}.png)" for d in sr_summaries
                       if (Path(args.figures) / f"self_repair_{d}.png").exists()] + [""]
    out += ["## Runtimes", "", "| stage | seconds |", "|---|---|"]
    out += [f"| {k} | {v:.0f} |" for k, v in timings.items()] + [""]
    out += ["## Log", "", "```"] + log_lines[-200:] + ["```", ""]
    Path(args.out).write_text("\n".join(out), encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
