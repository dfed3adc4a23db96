"""Cost of GIM: forward+backward with the full GIM hook set over plain forward+backward.

Measured side by side in one run on SmolLM2-135M-Instruct (TransformerBridge, fp32), at
seq 64 and 512, batch 1 and 8. For each shape it reports:

* time: median wall time of forward+backward, plain and GIM runs interleaved;
* saved: bytes autograd keeps for backward (distinct storages seen by ``saved_tensors_hooks``),
  the memory that grows with batch × heads × seq² — the exact "no extra [b,h,q,k] per layer" check;
* peak: peak RSS of a fresh process running one forward+backward, minus its RSS before it
  (each mode in its own subprocess, since ru_maxrss never goes down).

Usage: ``python benchmarks/overhead.py [--repeats 5] [--shapes 1x64,8x64,1x512,8x512] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

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
    """Bytes of the distinct storages autograd saves for backward during one forward."""
    storages: dict[int, int] = {}

    def pack(t):
        if t.device.type == "cpu" or t.is_cuda:
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


def peak_child(batch: int, seq: int, mode: str) -> float:
    """Peak RSS growth (MB) of one forward+backward in a fresh subprocess."""
    out = subprocess.run([sys.executable, __file__, "--child", f"{batch}x{seq}", mode],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def child(shape: str, mode: str) -> None:
    batch, seq = map(int, shape.split("x"))
    model = load_model()
    tokens = torch.randint(100, model.cfg.d_vocab, (batch, seq))
    hook_set = GIMHookSet() if mode == "gim" else None
    fwd_bwd(model, tokens[:, :8], hook_set)  # warm-up at a tiny size
    model.zero_grad(set_to_none=True)
    before = rss_mb()
    base_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    fwd_bwd(model, tokens, hook_set)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": max(peak, base_peak) - before}))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", default="1x64,8x64,1x512,8x512")
    parser.add_argument("--out", default=None, help="append the markdown table to this file")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--child", nargs=2, metavar=("SHAPE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the peak-memory subprocesses
    if args.child:
        child(*args.child)
        return

    torch.manual_seed(0)
    model = load_model()
    gim = GIMHookSet()
    rows = []
    for shape in args.shapes.split(","):
        batch, seq = map(int, shape.split("x"))
        tokens = torch.randint(100, model.cfg.d_vocab, (batch, seq))
        fwd_bwd(model, tokens, None)
        fwd_bwd(model, tokens, gim)  # warm-up both paths
        times = {"plain": [], "gim": []}
        for _ in range(args.repeats):
            for mode, hs in (("plain", None), ("gim", gim)):
                t0 = time.perf_counter()
                fwd_bwd(model, tokens, hs)
                times[mode].append(time.perf_counter() - t0)
        gim.verify()
        t_plain, t_gim = (statistics.median(times[m]) for m in ("plain", "gim"))
        s_plain, s_gim = saved_bytes(model, tokens, None), saved_bytes(model, tokens, gim)
        p_plain, p_gim = peak_child(batch, seq, "plain"), peak_child(batch, seq, "gim")
        rows.append((batch, seq, t_plain, t_gim, s_plain / 2**20, s_gim / 2**20, p_plain, p_gim))
        print(f"batch {batch} seq {seq}: time {t_plain:.3f}s -> {t_gim:.3f}s ({t_gim / t_plain:.3f}x), "
              f"saved {s_plain / 2**20:.0f} -> {s_gim / 2**20:.0f} MiB ({s_gim / s_plain:.3f}x), "
              f"peak {p_plain:.0f} -> {p_gim:.0f} MB ({p_gim / p_plain:.3f}x)", flush=True)

    header = (f"SmolLM2-135M-Instruct, TransformerBridge fp32, {cpu_name()}, {torch.get_num_threads()} threads, "
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
