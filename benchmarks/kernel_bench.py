"""Speed of the fused Triton TSG backward (``gim_tl.kernel.tsg_backward``) on one CUDA GPU.

For each ``[batch, head, seq, seq]`` shape (causal ``-inf`` mask), dtype (fp32, bf16) and
source (pattern or scores) it reports, from CUDA-event timings (warm-up, then the median of
repeats):

* **kernel**: ``tsg_backward`` at T = 2, and its effective bandwidth: bytes of source + g
  (input dtype) + dS (fp32), over time;
* **% copy**: that bandwidth as a fraction of a device-to-device ``copy_`` moving the same
  number of bytes (half read, half written), measured in the same run — the practical roofline;
* **softmax bwd**: PyTorch's own softmax backward, ``torch._softmax_backward_data`` (what autograd
  runs for ``softmax``; it writes dS in the input dtype, so it moves fewer bytes for bf16);
* **eager TSG**: ``gim_tl.fast.tsg_grad_scores_torch``, the PyTorch path the kernel replaces;
* **max err**: ``max|kernel − eager| / max|eager|`` as a correctness check.

A correctness pre-check over odd key lengths (1, 17, 100, 8192, 8193, 20000) runs first and aborts
on a mismatch. Takes about 1–3 minutes on an H100.

Usage: ``python benchmarks/kernel_bench.py [--quick] [--repeats 50] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch

# (batch, heads, seq): interpretability shapes from GPT-2-small-like (12 heads) to 7B-like (32).
SHAPES = [
    (1, 9, 64), (32, 9, 64), (8, 12, 128), (32, 12, 256), (4, 16, 512), (32, 16, 512),
    (4, 32, 1024), (2, 32, 2048), (1, 32, 4096), (2, 32, 4096),
]
QUICK_SHAPES = [(1, 9, 64), (32, 12, 256), (4, 32, 1024), (1, 32, 4096)]
LONG_SHAPE = (1, 4, 16384)  # rows longer than MAX_FUSED_COLS: the looped kernel
TEMPERATURE = 2.0


def _cuda_time_ms(fn, repeats: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` CUDA-event-timed calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _timed(fn, repeats: int, warmup: int) -> float | None:
    """``_cuda_time_ms``, or None when the device runs out of memory."""
    try:
        return _cuda_time_ms(fn, repeats, warmup)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def _copy_time(n_bytes: int, repeats: int, warmup: int) -> float | None:
    """Median ms of a device-to-device copy reading ``n_bytes / 2`` and writing ``n_bytes / 2``."""
    try:
        src = torch.empty(n_bytes // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    return _timed(lambda: dst.copy_(src), repeats, warmup)


def _inputs(batch, heads, seq, dtype, source_is_scores, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (batch, heads, seq, seq)
    scores = torch.randn(shape, device="cuda", dtype=dtype, generator=gen) * 3
    causal = torch.ones(seq, seq, device="cuda", dtype=torch.bool).triu(1)
    scores.masked_fill_(causal, float("-inf"))
    grad = torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
    pattern = scores.float().softmax(-1).to(dtype)
    return (scores if source_is_scores else pattern), pattern, grad


def _tsg_fp64(source, grad, temperature, *, source_is_scores, row_valid=None):
    """The TSG formula in float64 (the eager reference computes in fp32): the precheck's truth."""
    from gim_tl.masks import masked_below

    x = source.double()
    if source_is_scores:
        x = x.masked_fill(masked_below(source), float("-inf")) / temperature
        row_max = x.amax(-1, keepdim=True)
        weights = torch.exp(x - torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)))
    else:
        weights = x.clamp_min(0).pow(1.0 / temperature)
    total = weights.sum(-1, keepdim=True)
    a_t = weights / torch.where(total > 0, total, torch.ones_like(total))
    g = grad.double()
    d_scores = a_t * (g - (a_t * g).sum(-1, keepdim=True))
    return d_scores if row_valid is None else d_scores * row_valid.unsqueeze(-1)


def precheck(kernel, reference) -> None:
    """Kernel and eager fp32 TSG vs an fp64 truth on odd shapes, masks and both paths.

    Exits on a kernel error above 1e-4 of the row scale. fp32 rounding in ``Σ A_T g`` is
    amplified where ``g_j ≈ Σ A_T g`` (cancellation), so the eager fp32 path itself is off by
    up to ~1e-5 here; hence the fp64 truth rather than a tight kernel-vs-eager threshold.
    """
    torch.manual_seed(0)
    worst_kernel = worst_eager = 0.0
    for n_keys in (1, 17, 100, kernel.MAX_FUSED_COLS, kernel.MAX_FUSED_COLS + 1, 20000):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            rows = 3 if n_keys > 4096 else 37
            scores = (torch.randn(rows, n_keys, device="cuda") * 4).to(dtype)
            scores[0] = float("-inf")  # fully masked row
            if n_keys > 1:
                scores[1, : n_keys // 2] = torch.finfo(dtype).min  # bridge-style mask
            grad = torch.randn(rows, n_keys, device="cuda").to(dtype)
            row_valid = torch.rand(rows, device="cuda") > 0.2
            for source_is_scores in (True, False):
                source = scores if source_is_scores else scores.float().softmax(-1).nan_to_num(0).to(dtype)
                for temperature in (1.0, 3.5):
                    for rv in (None, row_valid):
                        kw = dict(source_is_scores=source_is_scores, row_valid=rv)
                        out = kernel.tsg_backward(source, grad, temperature, **kw)
                        eager = reference(source, grad, temperature, **kw)
                        truth = _tsg_fp64(source, grad, temperature, **kw)
                        scale = truth.abs().max().clamp_min(1e-30)
                        err = ((out.double() - truth).abs().max() / scale).item()
                        worst_kernel = max(worst_kernel, err)
                        worst_eager = max(worst_eager, ((eager.double() - truth).abs().max() / scale).item())
                        if not err < 1e-4 or out.isnan().any():
                            sys.exit(f"PRECHECK FAILED: n_keys={n_keys} dtype={dtype} scores={source_is_scores} "
                                     f"T={temperature} row_valid={rv is not None}: rel err {err:.3g}")
    print(f"precheck ok vs fp64: worst max|err| / max|dS|: kernel {worst_kernel:.1e}, "
          f"eager fp32 {worst_eager:.1e}\n", flush=True)


def bench_one(kernel, reference, batch, heads, seq, dtype, source_is_scores, repeats, warmup):
    source, pattern, grad = _inputs(batch, heads, seq, dtype, source_is_scores)
    n = source.numel()
    moved = n * (source.element_size() + grad.element_size() + 4)  # read source, g; write fp32 dS

    def run_kernel():
        return kernel.tsg_backward(source, grad, TEMPERATURE, source_is_scores=source_is_scores)

    def run_eager():
        return reference(source, grad, TEMPERATURE, source_is_scores=source_is_scores)

    out = run_kernel()
    try:
        ref = run_eager()
        err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        del ref
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        err = float("nan")
    out = None

    t_kernel = _timed(run_kernel, repeats, warmup)
    t_copy = _copy_time(moved, repeats, warmup)
    t_softmax = _timed(lambda: torch._softmax_backward_data(grad, pattern, -1, dtype), repeats, warmup)
    t_eager = _timed(run_eager, max(5, repeats // 4), max(2, warmup // 2))
    return dict(moved=moved, t_kernel=t_kernel, t_copy=t_copy, t_softmax=t_softmax,
                t_eager=t_eager, err=err)


def _fmt_us(ms):
    return "OOM" if ms is None else f"{ms * 1e3:,.1f}"


def _ratio(a, b, fmt="{:.2f}×"):
    return "–" if a is None or b is None else fmt.format(a / b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="four shapes only")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per measurement (median)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--no-long", action="store_true", help=f"skip the looped-path shape {LONG_SHAPE}")
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        sys.exit("kernel_bench.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing to measure.")
    from gim_tl import kernel
    from gim_tl.fast import tsg_grad_scores_torch as tsg_grad_scores_reference

    if not kernel.triton_available():
        sys.exit("kernel_bench.py needs triton (pip install triton); it is not importable here.")
    import triton

    props = torch.cuda.get_device_properties(0)
    header = (f"Device: {props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
              f"triton {triton.__version__}. TSG at T = {TEMPERATURE}, causal -inf mask, "
              f"median of {args.repeats} CUDA-event timings after {args.warmup} warm-up calls "
              f"(eager TSG: {max(5, args.repeats // 4)}).")
    print(header + "\n", flush=True)
    precheck(kernel, tsg_grad_scores_reference)

    shapes = list(QUICK_SHAPES if args.quick else SHAPES)
    if not args.no_long:
        shapes.append(LONG_SHAPE)
    columns = ["batch", "heads", "seq", "dtype", "source", "MB moved", "kernel µs", "GB/s", "% copy",
               "softmax bwd µs", "kernel / softmax bwd", "eager TSG µs", "speed-up vs eager", "max err"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    print(lines[0] + "\n" + lines[1], flush=True)
    for batch, heads, seq in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            for source_is_scores in (False, True):
                r = bench_one(kernel, tsg_grad_scores_reference, batch, heads, seq, dtype,
                              source_is_scores, args.repeats, args.warmup)
                torch.cuda.empty_cache()
                gbps = None if r["t_kernel"] is None else r["moved"] / (r["t_kernel"] * 1e-3) / 1e9
                cells = [
                    batch, heads, seq, str(dtype).removeprefix("torch."),
                    "scores" if source_is_scores else "pattern",
                    f"{r['moved'] / 1e6:,.1f}", _fmt_us(r["t_kernel"]),
                    "–" if gbps is None else f"{gbps:,.0f}",
                    _ratio(r["t_copy"], r["t_kernel"], "{:.0%}"),
                    _fmt_us(r["t_softmax"]), _ratio(r["t_kernel"], r["t_softmax"]),
                    _fmt_us(r["t_eager"]), _ratio(r["t_eager"], r["t_kernel"]),
                    "nan" if math.isnan(r["err"]) else f"{r['err']:.1e}",
                ]
                line = "| " + " | ".join(str(c) for c in cells) + " |"
                lines.append(line)
                print(line, flush=True)

    notes = ("\n% copy = time of a device-to-device copy moving the same bytes (half read, half written) "
             "/ kernel time. Rows longer than "
             f"{kernel.MAX_FUSED_COLS} keys use the looped kernel (inputs read twice). Small shapes are "
             "launch-bound.")
    print(notes)
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + "\n\n" + "\n".join(lines) + "\n" + notes + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
