"""Cost of GIM: forward+backward with the full GIM hook set over plain forward+backward.

Measured side by side in one run on SmolLM2-135M-Instruct (TransformerBridge, fp32), at
seq 64 and 512, batch 1 and 8. For each shape it reports:

* time: median wall time of forward+backward, plain and GIM runs interleaved (GIM includes
  attaching its hooks, ~7 ms, on every call);
* saved: bytes autograd keeps for backward (distinct storages seen by ``saved_tensors_hooks``),
  the memory that grows with batch × heads × seq² — the exact "no extra [b,h,q,k] per layer" check;
* peak: peak RSS of a fresh process running one forward+backward, minus its RSS before it
  (each mode in its own subprocess, since ru_maxrss never goes down).

Every measurement runs in a subprocess of its own, so at most one model and one batch are in
memory (batch 8 × seq 512 needs about 15 GB of the machine's 24).

Usage: ``python benchmarks/overhead.py [--repeats 5] [--shapes 1x64,8x64,1x512,8x512] [--threads N] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import cpu_model  # noqa: E402

from gim_tl import GIMHookSet  # noqa: E402
from gim_tl.models import load_model  # noqa: E402


def fwd_bwd(model, tokens, hook_set: GIMHookSet | None) -> None:
    """One forward+backward of the summed last-position logits, with or without GIM."""
    model.zero_grad(set_to_none=True)
    if hook_set is None:
        model(tokens)[:, -1].sum().backward()
    else:
        with hook_set.attach(model):
            model(tokens)[:, -1].sum().backward()


def saved_bytes(model, tokens, hook_set: GIMHookSet | None) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for backward during one forward."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if hook_set is None:
            loss = model(tokens)[:, -1].sum()
        else:
            with hook_set.attach(model):
                loss = model(tokens)[:, -1].sum()
    del loss
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(task: str, shape: str, mode: str, repeats: int) -> dict:
    """``time``: interleaved plain/GIM timings and saved bytes; ``peak``: one pass's peak RSS growth."""
    batch, seq = map(int, shape.split("x"))
    torch.manual_seed(0)
    model = load_model()
    tokens = torch.randint(100, model.cfg.d_vocab, (batch, seq))
    gim = GIMHookSet()
    if task == "peak":
        hook_set = gim if mode == "gim" else None
        fwd_bwd(model, tokens[:, :8], hook_set)  # warm-up at a tiny size
        model.zero_grad(set_to_none=True)
        before = rss_mb()
        fwd_bwd(model, tokens, hook_set)
        return {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before}
    fwd_bwd(model, tokens, None)
    fwd_bwd(model, tokens, gim)  # warm-up both paths
    times: dict[str, list[float]] = {"plain": [], "gim": []}
    for _ in range(repeats):
        for name, hook_set in (("plain", None), ("gim", gim)):
            t0 = time.perf_counter()
            fwd_bwd(model, tokens, hook_set)
            times[name].append(time.perf_counter() - t0)
    gim.verify()
    model.zero_grad(set_to_none=True)
    return {"plain": statistics.median(times["plain"]), "gim": statistics.median(times["gim"]),
            "saved_plain": saved_bytes(model, tokens, None), "saved_gim": saved_bytes(model, tokens, gim)}


def run_child(task: str, shape: str, mode: str, repeats: int) -> dict:
    """Run :func:`child` in a fresh subprocess (so each measurement owns its memory)."""
    # Large blocks straight from mmap, so a free returns to the OS and RSS tracks live memory
    # (with glibc's default thresholds, the same run's peak RSS varied by ±400 MB).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, __file__, "--child", task, shape, mode, str(repeats)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", default="1x64,8x64,1x512,8x512")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=None, help="append the markdown table to this file")
    parser.add_argument("--child", nargs=4, metavar=("TASK", "SHAPE", "MODE", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the subprocesses
    if args.child:
        task, shape, mode, repeats = args.child
        print(json.dumps(child(task, shape, mode, int(repeats))))
        return

    rows = []
    for shape in args.shapes.split(","):
        batch, seq = map(int, shape.split("x"))
        timing = run_child("time", shape, "both", args.repeats)
        peak = {mode: run_child("peak", shape, mode, 1)["peak_mb"] for mode in ("plain", "gim")}
        row = (batch, seq, timing["plain"], timing["gim"], timing["saved_plain"] / 2**20,
               timing["saved_gim"] / 2**20, peak["plain"], peak["gim"])
        rows.append(row)
        _, _, tp, tg, sp, sg, pp, pg = row
        print(f"batch {batch} seq {seq}: time {tp:.3f}s -> {tg:.3f}s ({tg / tp:.3f}x), saved {sp:.0f} -> {sg:.0f} MiB "
              f"({sg / sp:.3f}x), peak {pp:.0f} -> {pg:.0f} MB ({pg / pp:.3f}x)", flush=True)

    threads = args.threads or torch.get_num_threads()
    header = (f"SmolLM2-135M-Instruct, TransformerBridge fp32, {cpu_model()}, {threads} thread(s), "
              f"torch {torch.__version__}, median of {args.repeats}, {time.strftime('%Y-%m-%d')}\n\n"
              "| batch | seq | plain fwd+bwd (s) | GIM fwd+bwd (s) | time ratio | saved for backward plain → GIM (MiB) "
              "| saved ratio | peak RSS growth plain → GIM (MB) | peak ratio |\n"
              "|---|---|---|---|---|---|---|---|---|\n")
    table = header + "".join(
        f"| {b} | {s} | {tp:.3f} | {tg:.3f} | **{tg / tp:.3f}×** | {sp:.0f} → {sg:.0f} | **{sg / sp:.3f}×** "
        f"| {pp:.0f} → {pg:.0f} | **{pg / pp:.3f}×** |\n" for b, s, tp, tg, sp, sg, pp, pg in rows)
    print("\n" + table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
