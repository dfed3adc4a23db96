"""Cost of GIM: forward+backward with the full GIM hook set over plain forward+backward.

Measured side by side in one run on SmolLM2-135M-Instruct (TransformerBridge, fp32), at
seq 64 and 512, batch 1 and 8, for two backward passes:

* ``params``: ``loss.backward()`` into every parameter's ``.grad`` (the usual training-style call);
* ``inputs``: ``torch.autograd.grad`` into the input embeddings only, with frozen weights (what
  gim_tl's attributions, AtP and EAP run: no weight gradients, so the relative cost of GIM is larger).

For each shape it reports:

* time: plain and GIM runs interleaved (at least ``--repeats`` pairs, and ``--min-seconds`` (20 s)
  per mode; which of the two goes first alternates) on one model, GIM's hooks attached with ``add_to`` before a GIM
  pass and removed after it, outside the timed region (as in a loop over batches with the hooks
  attached once); the ratio is the median of the per-pair ratios. Noise on this VM mostly slows a pass
  down, so the ratio of the two modes' lower quartiles is printed beside it as a second reading. Attaching the
  hooks (``with gim.attach(model)``) is timed on its own;
* saved: bytes autograd keeps for backward at the end of the forward (the distinct storages of the
  tensors ``saved_tensors_hooks`` saw that are still alive then), the memory that grows with
  batch × heads × seq² — the exact "no extra [b,h,q,k] per layer" check (``--saved-only`` prints just
  this, one forward per mode and shape);
* peak: peak RSS of a fresh process running one forward+backward, minus its RSS before it
  (each mode in its own subprocess, since ru_maxrss never goes down).

Every measurement runs in a subprocess of its own, so at most one batch is in memory (batch 8 ×
seq 512 needs about 15 GB of the machine's 24). Peak-RSS processes run with
``MALLOC_MMAP_THRESHOLD_=65536`` so freed blocks go back to the OS and RSS tracks live memory.

Timing processes run, by default (``--allocator retain``), with glibc told to keep the memory it frees
(``_common.RETAIN_FREED_MEMORY``), so every timed pass reuses the heap the warm-up passes grew and the ratio
measures the work GIM adds. With glibc's defaults a pass's time also depends on how the passes before it left
the heap: at 4 × 512, plain passes of the same code in the same kind of process took from 9.2 s (no page
faults) to 11.9 s (1.2M faults) according to which passes ran before them, a spread five times the 5% being
measured (``page_faults.py`` shows it). ``--allocator glibc`` times with the defaults all the same.

Usage: ``python benchmarks/overhead.py [--repeats 5] [--min-seconds 20] [--shapes 1x64,8x64,1x512,8x512]
[--allocator retain|glibc] [--threads N] [--out FILE] [--saved-only] [--preset NAME]``; ``--preset`` times one
of the ablation presets (e.g. ``freeze_norm``: one rule's cost) in place of full GIM.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import weakref

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import RETAIN_FREED_MEMORY, cpu_model  # noqa: E402

from gim_tl import GIMHookSet  # noqa: E402
from gim_tl.models import load_model  # noqa: E402


def forward_loss(model, tokens, grad_to: str):
    """The summed last-position logits, and the embedding leaf to differentiate for ``inputs``."""
    if grad_to == "params":
        return model(tokens)[:, -1].sum(), None
    leaf = {}

    def make_leaf(x, hook):
        leaf["embed"] = x.detach().requires_grad_(True)
        return leaf["embed"]

    with model.hooks(fwd_hooks=[("hook_embed", make_leaf)]):
        return model(tokens)[:, -1].sum(), leaf["embed"]


def fwd_bwd(model, tokens, grad_to: str) -> None:
    """One forward+backward: into every parameter's ``.grad``, or into the input embeddings only."""
    model.zero_grad(set_to_none=True)
    loss, leaf = forward_loss(model, tokens, grad_to)
    if leaf is None:
        loss.backward()
    else:
        torch.autograd.grad(loss, leaf)


def saved_bytes(model, tokens, grad_to: str) -> int:
    """Bytes of the distinct storages autograd holds for backward at the end of one forward, parameters
    and buffers (e.g. a HookedTransformer's causal-mask tables) left out.

    Tensors saved by a graph that was freed during the forward (e.g. a fused LayerNorm's, whose
    backward the Bridge norm freeze replaces) are not counted: only those still alive when the forward returns.
    """
    saved: list[weakref.ref] = []

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = forward_loss(model, tokens, grad_to)
    fixed = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    live = {s.data_ptr(): s.nbytes() for s in (r().untyped_storage() for r in saved if r() is not None)}
    del loss
    return sum(n for ptr, n in live.items() if ptr not in fixed)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


#: Small shapes repeat pairs until each mode has run this long (the big ones stop at ``--repeats``).
MIN_SECONDS = float(os.environ.get("GIM_BENCH_MIN_SECONDS", "20"))
#: The hook set timed against plain: full GIM unless ``--preset`` names an ablation (one rule's cost).
PRESET = os.environ.get("GIM_BENCH_PRESET", "gim")


def hook_set() -> GIMHookSet:
    return GIMHookSet.preset(PRESET)


def load(grad_to: str, gim: GIMHookSet | None):
    """A fresh SmolLM2 bridge; frozen weights for ``inputs``; GIM's hooks attached for good if given."""
    model = load_model()
    if grad_to == "inputs":
        model.requires_grad_(False)
    if gim is not None:
        gim.add_to(model)
    return model


def child(task: str, shape: str, grad_to: str, mode: str, repeats: int) -> dict:
    """``time``: interleaved plain/GIM timings, attach time, saved bytes; ``peak``: one pass's peak RSS growth."""
    batch, seq = map(int, shape.split("x"))
    torch.manual_seed(0)
    tokens = torch.randint(100, 49152, (batch, seq))
    if task == "saved":
        model = load(grad_to, None)
        plain = saved_bytes(model, tokens, grad_to)
        with hook_set().attach(model):
            return {"saved_plain": plain, "saved_gim": saved_bytes(model, tokens, grad_to)}
    if task == "peak":
        model = load(grad_to, hook_set() if mode == "gim" else None)
        fwd_bwd(model, tokens[:, :8], grad_to)  # warm-up at a tiny size
        before = rss_mb()
        fwd_bwd(model, tokens, grad_to)
        return {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before}

    # One model, GIM's hooks attached (add_to) before each GIM pass and removed after it, outside the
    # timed region: two copies of the model differ by a few ms per pass from memory layout alone.
    gim = hook_set()
    model = load(grad_to, None)

    def timed_pass(name: str) -> float:
        if name == "gim":
            gim.add_to(model)
        gc.collect()
        t0 = time.perf_counter()
        fwd_bwd(model, tokens, grad_to)
        elapsed = time.perf_counter() - t0
        if name == "gim":
            gim.verify()
            gim.remove_from(model)
        return elapsed

    for name in ("plain", "gim"):  # warm-up both paths
        timed_pass(name)
    times: dict[str, list[float]] = {"plain": [], "gim": []}
    while len(times["plain"]) < repeats or sum(times["plain"]) < MIN_SECONDS:
        order = ("plain", "gim") if len(times["plain"]) % 2 == 0 else ("gim", "plain")  # alternate who goes first
        for name in order:
            times[name].append(timed_pass(name))
    attach = []
    for _ in range(20):
        t0 = time.perf_counter()
        with hook_set().attach(model):
            pass
        attach.append(time.perf_counter() - t0)
    ratios = [g / p for g, p in zip(times["gim"], times["plain"], strict=True)]
    q1 = {name: statistics.quantiles(t, n=4)[0] for name, t in times.items()}
    model.zero_grad(set_to_none=True)
    saved_plain = saved_bytes(model, tokens, grad_to)
    with gim.attach(model):
        saved_gim = saved_bytes(model, tokens, grad_to)
    return {"pairs": len(ratios), "plain": statistics.median(times["plain"]), "gim": statistics.median(times["gim"]),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ratio_q1": q1["gim"] / q1["plain"],
            "attach": statistics.median(attach),
            "saved_plain": saved_plain, "saved_gim": saved_gim}


def run_child(task: str, shape: str, grad_to: str, mode: str, repeats: int, allocator: str = "retain") -> dict:
    """Run :func:`child` in a fresh subprocess (so each measurement owns its memory); timings under
    ``allocator`` (``retain``: :data:`RETAIN_FREED_MEMORY`; ``glibc``: the defaults)."""
    env = dict(os.environ)
    if task == "time" and allocator == "retain":
        env.update(RETAIN_FREED_MEMORY)
    if task == "peak":
        # Large blocks straight from mmap, so a free returns to the OS and RSS tracks live memory
        # (with glibc's default thresholds, the same run's peak RSS varied by ±400 MB).
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run([sys.executable, __file__, "--child", task, shape, grad_to, mode, str(repeats)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", default="1x64,8x64,1x512,8x512")
    parser.add_argument("--grad-to", default="params,inputs", help="backward passes to time: params, inputs")
    parser.add_argument("--preset", default=PRESET, help="hook set to time against plain (default: gim, full GIM)")
    parser.add_argument("--min-seconds", type=float, default=None,
                        help=f"time each mode at least this long per shape (default {MIN_SECONDS:.0f})")
    parser.add_argument("--allocator", choices=("retain", "glibc"), default="retain",
                        help="timing processes keep the memory they free (retain, default) or use glibc's defaults")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=None, help="append the markdown table to this file")
    parser.add_argument("--saved-only", action="store_true", help="measure only the bytes saved for backward")
    parser.add_argument("--child", nargs=5, metavar=("TASK", "SHAPE", "GRAD_TO", "MODE", "REPEATS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.preset != "gim":
        os.environ["GIM_BENCH_PRESET"] = args.preset  # read by the subprocesses
    if args.min_seconds:
        os.environ["GIM_BENCH_MIN_SECONDS"] = str(args.min_seconds)  # read by the subprocesses
    min_seconds = args.min_seconds or MIN_SECONDS
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the subprocesses
    if args.child:
        task, shape, grad_to, mode, repeats = args.child
        print(json.dumps(child(task, shape, grad_to, mode, int(repeats))))
        return
    if args.saved_only:
        print("| batch × seq | backward into | saved for backward plain → GIM (MiB) | saved ratio |\n|---|---|---|---|")
        for shape in args.shapes.split(","):
            for grad_to in args.grad_to.split(","):
                r = run_child("saved", shape, grad_to, "both", 1)
                print(f"| {shape.replace('x', ' × ')} | {grad_to} | {r['saved_plain'] / 2**20:.0f} → "
                      f"{r['saved_gim'] / 2**20:.0f} | **{r['saved_gim'] / r['saved_plain']:.3f}×** |", flush=True)
        return

    rows = []
    for shape in args.shapes.split(","):
        for grad_to in args.grad_to.split(","):
            t = run_child("time", shape, grad_to, "both", args.repeats, args.allocator)
            peak = {mode: run_child("peak", shape, grad_to, mode, 1)["peak_mb"] for mode in ("plain", "gim")}
            row = dict(shape=shape, grad_to=grad_to, **t, peak_plain=peak["plain"], peak_gim=peak["gim"])
            rows.append(row)
            print(f"{shape} {grad_to}: time {t['plain']:.3f}s -> {t['gim']:.3f}s (pair ratio {t['ratio']:.3f}x, "
                  f"range {t['ratio_min']:.3f}-{t['ratio_max']:.3f}; lower quartiles {t['ratio_q1']:.3f}x), "
                  f"attach {1e3 * t['attach']:.1f} ms, "
                  f"saved {t['saved_plain'] / 2**20:.0f} -> {t['saved_gim'] / 2**20:.0f} MiB, "
                  f"peak {peak['plain']:.0f} -> {peak['gim']:.0f} MB", flush=True)

    threads = args.threads or torch.get_num_threads()
    header = (f"SmolLM2-135M-Instruct, TransformerBridge fp32, {cpu_model()}, {threads} thread(s), "
              f"torch {torch.__version__}, preset {args.preset!r} vs plain, "
              f"≥ {args.repeats} interleaved pairs (≥ {min_seconds:.0f} s per mode), "
              f"allocator {args.allocator!r} for the timings, "
              f"{time.strftime('%Y-%m-%d')}\n\n"
              "| batch × seq | backward into | pairs | plain fwd+bwd (s) | GIM fwd+bwd (s) | time ratio (range) "
              "| lower-quartile ratio "
              "| attach (ms) | saved for backward plain → GIM (MiB) | saved ratio "
              "| peak RSS growth plain → GIM (MB) | peak ratio |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    table = header + "".join(
        f"| {r['shape'].replace('x', ' × ')} | {r['grad_to']} | {r['pairs']} | {r['plain']:.3f} | {r['gim']:.3f} "
        f"| **{r['ratio']:.3f}×** ({r['ratio_min']:.3f}–{r['ratio_max']:.3f}) | {r['ratio_q1']:.3f}× "
        f"| {1e3 * r['attach']:.1f} "
        f"| {r['saved_plain'] / 2**20:.0f} → {r['saved_gim'] / 2**20:.0f} "
        f"| **{r['saved_gim'] / r['saved_plain']:.3f}×** "
        f"| {r['peak_plain']:.0f} → {r['peak_gim']:.0f} | **{r['peak_gim'] / r['peak_plain']:.3f}×** |\n"
        for r in rows)
    print("\n" + table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
