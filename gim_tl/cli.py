"""``gim-tl`` command line: explain a next-token prediction with GIM beside other attribution methods.

    gim-tl explain                                     # SmolLM2, "The capital of France is" → argmax
    gim-tl explain "The capital of France is" --target " Paris" --contrast " Rome"
    gim-tl explain --file prompts.txt --out results/   # one prompt per line, optional "<TAB> target"
    gim-tl explain "2 + 3 =" --target-id 20            # a target given by token id

Prints a table of per-token scores (one column per method) and writes an HTML heatmap and a PNG.
User mistakes (a target that is not one token, a missing file, ...) end with a one-line message
and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import html
import math
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PROMPT = "The capital of France is"
DEFAULT_METHODS = ("gim", "grad_x_input")
DEFAULT_OUT = "gim_tl_out"

#: Exceptions that mean "the user asked for something that cannot be done", reported without traceback.
USER_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, ImportError, NotImplementedError)


class UsageError(Exception):
    """A user mistake found by the command line itself."""


@dataclass(frozen=True)
class Job:
    """One prompt to explain, with its optional target from the prompts file."""

    prompt: str
    target: str | int | None
    where: str = ""


def build_parser() -> argparse.ArgumentParser:
    from gim_tl.attribution import METHODS

    parser = argparse.ArgumentParser(prog="gim-tl", description="GIM token attributions for TransformerLens models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    ex = sub.add_parser(
        "explain", help="attribute a next-token logit to the prompt's tokens",
        description="Attribute the logit of the next token to the prompt's tokens with GIM and other methods. "
                    "Without arguments: SmolLM2-135M-Instruct on \"The capital of France is\", explaining its top "
                    "prediction.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ex.add_argument("prompt", nargs="?", default=None, help=f"the prompt (default: {DEFAULT_PROMPT!r})")
    target = ex.add_mutually_exclusive_group()
    target.add_argument("--target", help="the explained next token as text, exactly one token (mind the leading "
                                         "space: ' Paris'); default: the model's top prediction")
    target.add_argument("--target-id", type=int, metavar="ID", help="the explained next token by its token id")
    contrast = ex.add_mutually_exclusive_group()
    contrast.add_argument("--contrast", help="explain logit[target] - logit[contrast] instead of logit[target]")
    contrast.add_argument("--contrast-id", type=int, metavar="ID", help="the contrast token by its token id")
    ex.add_argument("--method", action="append", choices=METHODS, metavar="METHOD",
                    help=f"attribution method, repeatable; one of {', '.join(METHODS)} "
                         f"(default: {' and '.join(DEFAULT_METHODS)})")
    ex.add_argument("--baseline", default="space", choices=("space", "pad", "zero"),
                    help="embedding baseline e' in score = (e - e')·grad")
    ex.add_argument("--position", type=int, default=-1, help="explained position among the prompt's tokens")
    ex.add_argument("--file", type=Path, help="prompts file: one prompt per line, optionally '<TAB> target'")
    ex.add_argument("--model", default=None,
                    help="local HF checkpoint directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    ex.add_argument("--backend", default="bridge", choices=("bridge", "hooked"),
                    help="TransformerBridge, or HookedTransformer (TransformerLens 3.9 only)")
    ex.add_argument("--device", default="cpu", help="torch device")
    ex.add_argument("--prepend-bos", action="store_true", help="put the tokenizer's BOS token before the prompt")
    ex.add_argument("--ig-steps", type=int, default=50, help="integrated-gradients steps")
    ex.add_argument("--ig-full-path", action="store_true",
                    help="also interpolate the first token along the IG path (default keeps it at its embedding)")
    ex.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="output directory for HTML and PNG files")
    ex.add_argument("--no-png", action="store_true", help="write HTML only")
    return parser


def read_jobs(path: Path, default_target: str | int | None) -> list[Job]:
    """Prompts from a file: one per line, ``prompt<TAB>target`` or just ``prompt``; blank lines skipped."""
    if path.is_dir():
        raise UsageError(f"prompts file {str(path)!r} is a directory; give a text file with one prompt per line")
    if not path.is_file():
        raise UsageError(f"prompts file {str(path)!r} does not exist")
    jobs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        prompt, sep, target = line.partition("\t")
        if not prompt.strip():
            raise UsageError(f"{path}:{n}: the prompt is empty")
        jobs.append(Job(prompt, target if sep and target else default_target, where=f"{path}:{n}: "))
    if not jobs:
        raise UsageError(f"prompts file {str(path)!r} has no prompts")
    return jobs


def explain_one(model, job: Job, args) -> object:
    """Every requested method on one prompt, as a :class:`~gim_tl.attribution.Comparison`.

    Warns (stderr) about a text target or contrast that is likely a slip: a number (a token id was
    probably meant: ``--target-id``) or a word without its leading space when the spaced form is one
    token and far more likely.
    """
    from gim_tl.attribution import attribute_tokens, compare

    methods = list(dict.fromkeys(args.method or DEFAULT_METHODS))
    contrast = args.contrast_id if args.contrast_id is not None else args.contrast
    for flag, value in (("--target", job.target), ("--contrast", contrast)):
        if isinstance(value, str) and value.strip().isdigit():
            warn(f"{job.where}{flag} {value!r} is read as text (the token {value!r}); to give token id {value.strip()} "
                 f"use {flag}-id {value.strip()}")
    results = []
    target = job.target
    for method in methods:
        try:
            result = attribute_tokens(model, job.prompt, target, method=method, baseline=args.baseline,
                                      position=args.position, contrast=contrast, prepend_bos=args.prepend_bos,
                                      ig_steps=args.ig_steps, ig_keep_first=not args.ig_full_path)
        except ValueError as err:
            hint = ""
            for flag, value in (("--target", target), ("--contrast", contrast)):
                if isinstance(value, str) and value.strip().isdigit() and repr(value) in str(err):
                    hint = f" To give a token id, use {flag}-id {value.strip()}."
            raise UsageError(f"{job.where}{err}{hint}") from err
        target = int(result.target_ids[0])  # the first method's argmax: the same token for every method
        results.append(result)
    comparison = compare(*results)
    for flag, value in (("--target", job.target), ("--contrast", contrast)):
        hint = leading_space_hint(model, comparison, value, flag)
        if hint:
            warn(f"{job.where}{hint}")
    return comparison


def warn(message: str) -> None:
    print(f"gim-tl: warning: {message}", file=sys.stderr)


#: A target without its leading space draws a warning when the spaced form is this many times more likely.
LEADING_SPACE_RATIO = 10.0


def leading_space_hint(model, comparison, text, flag: str) -> str | None:
    """A warning when ``text`` lacks a leading space, ``" " + text`` is one token, and the model finds
    that token at least :data:`LEADING_SPACE_RATIO` times more likely at the explained position."""
    tok = getattr(model, "tokenizer", None)
    if not isinstance(text, str) or not text or text[0].isspace() or tok is None:
        return None
    spaced = list(tok(" " + text, add_special_tokens=False)["input_ids"])
    plain = list(tok(text, add_special_tokens=False)["input_ids"])
    if len(spaced) != 1 or len(plain) != 1:
        return None
    log_probs = next_token_log_probs(model, comparison)
    ratio = math.exp(float(log_probs[spaced[0]] - log_probs[plain[0]]))
    if ratio < LEADING_SPACE_RATIO:
        return None
    return (f"{flag} {text!r} has no leading space, but {' ' + text!r} is one token and {ratio:.3g}x more likely "
            f"here; mind the leading space: {flag} {' ' + text!r}")


def next_token_log_probs(model, comparison):
    """Log-probabilities of the next token at the explained position (one forward, no gradient)."""
    import torch

    first = comparison.results[0]
    tokens = first.token_ids.to(next(model.parameters()).device)
    with torch.no_grad():
        return model(tokens)[0, int(first.position[0])].float().log_softmax(-1).cpu()


def top_predictions(model, comparison, k: int = 5) -> str:
    """The model's top-k next tokens at the explained position, e.g. ``' Paris' 17.37, ' the' 14.1``."""
    import torch

    first = comparison.results[0]
    tokens = first.token_ids.to(next(model.parameters()).device)
    with torch.no_grad():
        logits = model(tokens)[0, int(first.position[0])].float()
    values, ids = logits.topk(k)
    return ", ".join(f"{model.tokenizer.decode([int(i)])!r} {float(v):.2f}" for v, i in zip(values, ids, strict=True))


def write_views(comparison, stem: Path, png: bool) -> list[Path]:
    """``stem.html`` and (if ``png``) ``stem.png``; returns the paths written."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    html_path = stem.with_suffix(".html")
    comparison.to_html(html_path)
    written = [html_path]
    if png:
        written.append(comparison.save_png(stem.with_suffix(".png")))
    return written


def _png_available(wanted: bool) -> bool:
    if not wanted:
        return False
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("gim-tl: matplotlib is not installed, so no PNG is written (pip install 'gim_tl[views]')",
              file=sys.stderr)
        return False
    return True


def run_explain(args) -> int:
    if args.prompt is not None and args.file is not None:
        raise UsageError("give either a prompt or --file, not both")
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("the prompt is empty: give a prompt, or none for the default "
                         f"{DEFAULT_PROMPT!r}")
    if args.ig_steps < 1:
        raise UsageError("--ig-steps must be at least 1")
    target = args.target_id if args.target_id is not None else args.target
    jobs = read_jobs(args.file, target) if args.file is not None else [Job(args.prompt or DEFAULT_PROMPT, target)]
    png = _png_available(not args.no_png)

    from gim_tl.models import DEFAULT_MODEL, load_model

    source = args.model or DEFAULT_MODEL
    if args.model is not None and not Path(args.model).expanduser().exists():
        raise UsageError(f"--model {args.model!r}: no such file or directory (give a local HF checkpoint "
                         "directory or a .gguf file)")
    print(f"loading {source} ({args.backend}) ...", file=sys.stderr, flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(source, backend=args.backend, device=args.device)

    if args.file is None:
        comparison = explain_one(model, jobs[0], args)
        print(f"model:      {source} ({args.backend})")
        print(f"prompt:     {jobs[0].prompt!r}")
        print(f"top tokens: {top_predictions(model, comparison)}")
        print()
        print(comparison)
        written = write_views(comparison, args.out / "explain", png)
        print()
        print("wrote " + ", ".join(str(p) for p in written))
        return 0

    from tqdm import tqdm

    from gim_tl import views

    done: list[tuple[int, Job, object]] = []   # (number in the file's order, job, comparison)
    failed: list[str] = []
    for n, job in enumerate(tqdm(jobs, desc="prompts", unit="prompt", file=sys.stderr), start=1):
        try:
            done.append((n, job, explain_one(model, job, args)))
        except USER_ERRORS + (UsageError,) as err:  # one bad line must not throw away the others
            failed.append(str(err))
    for message in failed:
        print(f"gim-tl: error: {message}", file=sys.stderr)
    if not done:
        print(f"gim-tl: error: none of the {len(jobs)} prompts could be explained; nothing written", file=sys.stderr)
        return 2
    comparisons = [c for _, _, c in done]
    width = len(str(len(jobs)))
    written = []
    for n, _, comparison in done:
        written += write_views(comparison, args.out / f"explain_{n:0{width}d}", png)
    summary = "".join(f"<h3>{n}. {html.escape(job.prompt)}</h3>{c.to_html()}" for n, job, c in done)
    (args.out / "summary.html").write_text(views.html_page(summary, "gim-tl explain summary"), encoding="utf-8")
    written.append(args.out / "summary.html")
    if write_csv(comparisons, args.out / "summary.csv", [n for n, _, _ in done]):
        written.append(args.out / "summary.csv")
    print(summary_table(comparisons, [n for n, _, _ in done]))
    print()
    print(f"wrote {len(written)} files to {args.out}/ (per prompt: explain_N.html/.png; all prompts: "
          f"{', '.join(p.name for p in written[-2:])})")
    if failed:
        print(f"gim-tl: error: {len(failed)} of {len(jobs)} prompts failed (see above); the other {len(done)} "
              "were written", file=sys.stderr)
        return 2
    return 0


def write_csv(comparisons: Sequence, path: Path, numbers: Sequence[int] | None = None) -> bool:
    """All prompts' scores in one long CSV (a ``prompt`` column, one score column per method); needs pandas."""
    try:
        import pandas as pd
    except ImportError:
        print("gim-tl: pandas is not installed, so no summary.csv is written (pip install 'gim_tl[views]')",
              file=sys.stderr)
        return False
    frames = []
    numbers = list(numbers) if numbers is not None else list(range(1, len(comparisons) + 1))
    for n, c in zip(numbers, comparisons, strict=True):
        frame = c.to_dataframe().drop(columns=["example"])
        frame.insert(0, "prompt", n)
        frames.append(frame)
    pd.concat(frames, ignore_index=True).to_csv(path, index=False)
    return True


def summary_table(comparisons: Sequence, numbers: Sequence[int] | None = None) -> str:
    """One line per prompt: the explained token, the explained value, and each method's top-scored token."""
    labels = comparisons[0].labels
    numbers = list(numbers) if numbers is not None else list(range(1, len(comparisons) + 1))
    lines = [f"{'#':>3}  {'target':<12} {'value':>8}  " + "  ".join(f"{'top token: ' + lab:<24}" for lab in labels)]
    for n, c in zip(numbers, comparisons, strict=True):
        first = c.results[0]
        tops = []
        for r in c.results:
            scores = r.real_scores(0)
            best = max(range(len(scores)), key=lambda j: scores[j])
            tops.append(f"{r.real_tokens(0)[best]!r} {scores[best]:+.2f}")
        lines.append(f"{n:>3}  {first.target_strs[0]!r:<12} {float(first.metric_values[0]):>8.3f}  "
                     + "  ".join(f"{t:<24}" for t in tops))
    return "\n".join(line.rstrip() for line in lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gim-tl`` console script; returns the exit status (0 on success)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "explain":
            return run_explain(args)
    except UsageError as err:
        parser.exit(2, f"gim-tl: error: {err}\n")
    except USER_ERRORS as err:
        parser.exit(2, f"gim-tl: error: {err}\n")
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
