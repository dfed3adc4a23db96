"""GIM's extra time at large shapes, and the page faults behind it: plain vs GIM passes with their system time
and minor page faults.

One SmolLM2 bridge (fp32, backward into the input embeddings), plain and full-GIM forward+backward passes
interleaved in pairs (who goes first alternates; GIM attached with ``add_to`` outside the timed region, as in
``overhead.py``). Per pass it reads, besides the wall time, the process's system time and minor page faults
(``getrusage``). Run it twice to see what glibc's allocator does to the ratio: once as it is, and once with
``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824`` in the
environment (large blocks from the heap, and freed memory kept by the process rather than handed back to the
OS and faulted in again).

Usage: ``python benchmarks/page_faults.py [--shape 4x512] [--pairs 4]``
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from overhead import fwd_bwd, load  # noqa: E402

from gim_tl import GIMHookSet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4x512")
    parser.add_argument("--pairs", type=int, default=4)
    args = parser.parse_args()
    batch, seq = map(int, args.shape.split("x"))
    tokens = torch.randint(100, 49152, (batch, seq), generator=torch.Generator().manual_seed(0))
    model, gim = load("inputs", None), GIMHookSet()

    def one_pass(mode: str) -> tuple[float, float, int]:
        if mode == "gim":
            gim.add_to(model)
        before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        fwd_bwd(model, tokens, "inputs")
        wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        if mode == "gim":
            gim.remove_from(model)
        return wall, after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt

    one_pass("plain"), one_pass("gim")  # warm-up
    runs: dict[str, list] = {"plain": [], "gim": []}
    for i in range(args.pairs):
        for mode in ("plain", "gim") if i % 2 == 0 else ("gim", "plain"):
            runs[mode].append(one_pass(mode))
    ratios = [g[0] / p[0] for g, p in zip(runs["gim"], runs["plain"], strict=True)]
    allocator = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")} or "glibc defaults"
    print(f"SmolLM2 bridge, {args.shape}, backward into inputs, {torch.get_num_threads()} threads, "
          f"allocator: {allocator}")
    print(f"  GIM / plain wall time per pair: {', '.join(f'{r:.3f}' for r in ratios)} "
          f"(median {statistics.median(ratios):.3f}x)")
    for mode, rows in runs.items():
        wall, sys_time, faults = (statistics.median(row[j] for row in rows) for j in range(3))
        print(f"  {mode:<5} wall {wall:6.2f} s   system {sys_time:5.2f} s   minor page faults {faults:9.0f}")


if __name__ == "__main__":
    main()
