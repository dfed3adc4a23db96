"""GIM's extra time at large shapes, and the page faults behind it: plain vs GIM passes with their system time
and minor page faults.

One SmolLM2 bridge (fp32, backward into the input embeddings), plain and full-GIM forward+backward passes
interleaved in pairs (who goes first alternates; GIM attached with ``add_to`` outside the timed region, as in
``overhead.py``). Per pass it reads, besides the wall time, the process's system time and minor page faults
(``getrusage``). Run it twice to see what glibc's allocator does to the ratio: once as it is, and once with
``--allocator retain`` (``_common.RETAIN_FREED_MEMORY`` in the environment: large blocks from the heap, and freed
memory kept by the process rather than handed back to the OS and faulted in again).

``--separate`` runs each mode in processes of its own instead (blocks of ``--passes`` passes after one warm-up,
plain and GIM blocks alternating, ``--pairs`` blocks each): the allocator then settles into each mode's own steady
state, as when a researcher runs only GIM passes, rather than into the mixture that interleaving makes.

``--preset`` compares one ablation preset (e.g. ``tsg``) with plain in place of full GIM. With glibc's defaults
the plain passes themselves move by a quarter between runs (0 to 1.2M faults a pass at 4 × 512, after different
passes), which is why ``overhead.py`` times with the allocator keeping its memory.

Usage: ``python benchmarks/page_faults.py [--shape 4x512] [--pairs 4] [--separate [--passes 3]] [--preset gim]
[--allocator glibc|retain]``
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
from _common import RETAIN_FREED_MEMORY  # noqa: E402
from overhead import fwd_bwd, load  # noqa: E402

from gim_tl import GIMHookSet  # noqa: E402


def timed_passes(model, tokens, modes: list[str], gim: GIMHookSet) -> list[tuple[str, float, float, int]]:
    """One forward+backward per entry of ``modes``: ``(mode, wall s, system s, minor page faults)``."""
    rows = []
    for mode in modes:
        if mode == "gim":
            gim.add_to(model)
        before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        fwd_bwd(model, tokens, "inputs")
        wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        if mode == "gim":
            gim.remove_from(model)
        rows.append((mode, wall, after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt))
    return rows


def alternating(pairs: int) -> list[str]:
    """``pairs`` plain/GIM pairs, the first of each pair alternating (so drift hits both modes alike)."""
    return [mode for i in range(pairs) for mode in (("plain", "gim") if i % 2 == 0 else ("gim", "plain"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4x512")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--separate", action="store_true", help="each mode in processes of its own")
    parser.add_argument("--passes", type=int, default=3, help="timed passes per process with --separate")
    parser.add_argument("--preset", default="gim", help="hook set to compare with plain (default: gim, full GIM)")
    parser.add_argument("--allocator", choices=("glibc", "retain"), default="glibc",
                        help="glibc's defaults, or settings that keep freed memory (re-runs itself with them)")
    parser.add_argument("--block", default=None, help=argparse.SUPPRESS)  # a child process: the mode it runs
    args = parser.parse_args()
    if args.allocator == "retain" and any(os.environ.get(k) != v for k, v in RETAIN_FREED_MEMORY.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **RETAIN_FREED_MEMORY})
    batch, seq = map(int, args.shape.split("x"))
    tokens = torch.randint(100, 49152, (batch, seq), generator=torch.Generator().manual_seed(0))

    if args.block:  # one mode's block: a warm-up pass, then --passes timed ones, as JSON
        model = load("inputs", None)
        rows = timed_passes(model, tokens, [args.block] * (args.passes + 1), GIMHookSet.preset(args.preset))[1:]
        print(json.dumps(rows))
        return
    if args.separate:
        runs: dict[str, list] = {"plain": [], "gim": []}
        for mode in alternating(args.pairs):
            out = subprocess.run([sys.executable, __file__, "--shape", args.shape, "--passes", str(args.passes),
                                  "--preset", args.preset, "--block", mode], capture_output=True, text=True, check=True)
            runs[mode] += [tuple(row) for row in json.loads(out.stdout.strip().splitlines()[-1])]
    else:
        model, gim = load("inputs", None), GIMHookSet.preset(args.preset)
        timed_passes(model, tokens, ["plain", "gim"], gim)  # warm-up
        runs = {"plain": [], "gim": []}
        for row in timed_passes(model, tokens, alternating(args.pairs), gim):
            runs[row[0]].append(row)
    allocator = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")} or "glibc defaults"
    how = f"separate processes, {args.passes} passes each" if args.separate else "interleaved in one process"
    print(f"SmolLM2 bridge, {args.shape}, backward into inputs, preset {args.preset!r} vs plain, "
          f"{torch.get_num_threads()} threads, {how}, allocator: {allocator}")
    if not args.separate:
        ratios = [g[1] / p[1] for g, p in zip(runs["gim"], runs["plain"], strict=True)]
        print(f"  GIM / plain wall time per pair: {', '.join(f'{r:.3f}' for r in ratios)} "
              f"(median {statistics.median(ratios):.3f}x)")
    medians = {}
    for mode, rows in runs.items():
        wall, sys_time, faults = (statistics.median(row[j] for row in rows) for j in (1, 2, 3))
        medians[mode] = wall
        print(f"  {mode:<5} wall {wall:6.2f} s   system {sys_time:5.2f} s   minor page faults {faults:9.0f}   "
              f"({len(rows)} passes)")
    print(f"  median GIM pass / median plain pass: {medians['gim'] / medians['plain']:.3f}x")


if __name__ == "__main__":
    main()
