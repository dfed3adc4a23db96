"""Where GIM's extra time goes at a small shape: per-call wall time of each rule's pieces inside a real pass.

Runs forward+backward passes of SmolLM2-135M-Instruct (TransformerBridge, fp32) with full GIM attached, and
times each piece of GIM's own work where it runs: the forward hooks (as TL calls them) and the backward parts
(TSG's backward, the v and gate/up gradient scaling, the norm freeze's dropped node). It wraps the functions of
:mod:`gim_tl.fast` that the hook set calls with timers, in this process only. Inside a pass a piece
costs several times what the same call costs in a tight loop (the model's matmuls evict the caches between two
sites), so only an in-pass figure says what a site costs. A no-hook pass and a pass with no-op hooks at the
same hook points are timed beside it: the difference between them is TL's hook dispatch.

Usage: ``python benchmarks/site_costs.py [--shape 1x64] [--grad-to inputs] [--passes 30]``
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from overhead import fwd_bwd, load  # noqa: E402

from gim_tl import GIMHookSet, fast  # noqa: E402

TOTALS: collections.Counter = collections.Counter()
CALLS: collections.Counter = collections.Counter()


def timed(label: str, fn):
    """``fn`` with its wall time added to ``TOTALS[label]``."""

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TOTALS[label] += time.perf_counter() - t0
            CALLS[label] += 1

    return wrapper


def instrument() -> None:
    """Timers on the backward parts: each wraps the callback a rule registers, not the registration."""
    backward = fast.TSGBypass.backward
    fast.TSGBypass.backward = staticmethod(timed("bwd  TSG (Function backward)", backward))
    fast.scale_grad_by_hook = timed_callbacks(fast.scale_grad_by_hook, "bwd  v ×½ (tensor hook)")
    fast.scale_node_grad = timed_callbacks(fast.scale_node_grad, "bwd  gate/up ×½ (node pre-hook)")
    fast.drop_gradient = timed_callbacks(fast.drop_gradient, "bwd  norm freeze (dropped node)")


class _Timed:
    """Stands in for a tensor or autograd node: registers the rule's hook on it with a timer around it."""

    def __init__(self, target, label: str) -> None:
        self.target, self.label = target, label

    def register_hook(self, fn):
        return self.target.register_hook(timed(self.label, fn))

    def register_prehook(self, fn):
        return self.target.register_prehook(timed(self.label, fn))


def timed_callbacks(register, label: str):
    """A ``gim_tl.fast`` function (``scale_grad_by_hook``, ...) whose backward callback is timed under ``label``."""

    def install(target, *args, **kwargs):
        result = register(_Timed(target, label), *args, **kwargs)
        return target if isinstance(result, _Timed) else result

    return install


def timed_hooks(hooks: list) -> list:
    """GIM's forward hooks, each timed under its hook point's kind (``hook_v``, ``ln.hook_out``, ...)."""
    out = []
    for name, fn in hooks:
        kind = name.split(".")[-1]
        if ".ln" in name or name.startswith("ln"):
            kind = "ln." + kind
        out.append((name, timed(f"fwd  {kind}", fn)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1x64")
    parser.add_argument("--grad-to", default="inputs", choices=("inputs", "params"))
    parser.add_argument("--passes", type=int, default=30)
    args = parser.parse_args()
    batch, seq = map(int, args.shape.split("x"))
    tokens = torch.randint(100, 49152, (batch, seq), generator=torch.Generator().manual_seed(0))
    model = load(args.grad_to, None)
    instrument()
    gim = GIMHookSet()
    gim_hooks = timed_hooks(gim.fwd_hooks(model))
    noop_hooks = [(name, lambda x, hook: None) for name, _ in gim_hooks]

    def one_pass(hooks) -> float:
        with model.hooks(fwd_hooks=hooks):
            t0 = time.perf_counter()
            fwd_bwd(model, tokens, args.grad_to)
            return time.perf_counter() - t0

    variants = (("no hooks", []), ("no-op hooks", noop_hooks), ("GIM", gim_hooks))
    for _, hooks in variants * 2:  # warm-up
        one_pass(hooks)
    TOTALS.clear()
    CALLS.clear()
    times: dict[str, list[float]] = {label: [] for label, _ in variants}
    for _ in range(args.passes):  # interleaved, one pass each, so drift hits all three alike
        for label, hooks in variants:
            times[label].append(one_pass(hooks))
    print(f"SmolLM2 bridge, {args.shape}, backward into {args.grad_to}, torch threads {torch.get_num_threads()}")
    for label, t in times.items():
        print(f"  pass, {label:<12} {statistics.median(t) * 1e3:8.1f} ms (median of {args.passes})")
    print(f"  {len(gim_hooks)} GIM forward hooks; per pass and per call:")
    print(f"  {'piece':<38} {'calls/pass':>10} {'µs/call':>9} {'ms/pass':>8}")
    for label in sorted(TOTALS):
        calls = CALLS[label] / args.passes
        print(f"  {label:<38} {calls:>10.0f} {TOTALS[label] / CALLS[label] * 1e6:>9.1f} "
              f"{TOTALS[label] / args.passes * 1e3:>8.2f}")
    print(f"  {'sum of the timed pieces':<38} {'':>10} {'':>9} {sum(TOTALS.values()) / args.passes * 1e3:>8.2f}")


if __name__ == "__main__":
    main()
