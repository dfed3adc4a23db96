"""The fused Triton TSG kernel (``gim_tl.kernel``) against the TSG rule (``gim_tl.rules``) and autograd.

Runs on the CPU through triton's interpreter: ``TRITON_INTERPRET=1`` must be set before triton
is imported, hence the first lines. Shapes are small; the looped (long-row) path is exercised
both by a real row longer than ``MAX_FUSED_COLS`` and by shrinking the block constants.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install triton); the fused TSG kernel needs it",
                allow_module_level=True)

from gim_tl import kernel, rules  # noqa: E402
from gim_tl.fast import tempered_pattern  # noqa: E402

# triton.language imported before the line above set TRITON_INTERPRET (e.g. by conftest pulling in
# transformer_lens 3.9, which imports triton) cannot run kernels on the CPU in this process.
INTERPRETER_READY = torch.cuda.is_available() or (kernel._load_triton() and kernel._interpreter_ready())
#: Tests that launch no kernel in this process: they run even when the interpreter is not ready.
NO_LAUNCH = {"test_import_without_triton_does_not_fail", "test_triton_available_follows_device_and_interpreter",
             "test_validation_errors",
             "test_cpu_tensors_need_interpreter", "test_empty", "test_kernels_compile_for_sm90"}


@pytest.fixture(autouse=True)
def _needs_interpreter(request):
    if not INTERPRETER_READY and request.node.originalname not in NO_LAUNCH:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (e.g. by conftest via "
                    "transformer_lens); run with TRITON_INTERPRET=1 in the environment")

HALF = (torch.bfloat16, torch.float16)


def _scores(shape, *, spread=3.0, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * spread).to(dtype)


def _grad(shape, *, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype)


def _causal(scores, fill):
    q, k = scores.shape[-2:]
    future = torch.ones(q, k, dtype=torch.bool).triu(k - q + 1)
    return scores.masked_fill(future, fill)


def _pattern(scores):
    """``softmax(S)`` in the scores' dtype, as ``hook_pattern`` holds it (all -inf rows: 0, not NaN)."""
    return scores.float().softmax(-1).nan_to_num(0.0).to(scores.dtype)


def assert_close_rel(actual, expected, rtol=1e-5):
    """Elementwise ``|a − e| ≤ rtol · (|e| + max|e|)``: relative, with a row-scale floor."""
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    scale = expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(actual, expected.float(), rtol=rtol, atol=rtol * scale.item())


def tsg_rule(source, grad, temperature, *, source_is_scores, row_valid=None):
    """The readable rule, ``rules.tsg_grad`` at ``A_T``: ``rules.tempered_softmax`` of the scores, or from a
    pattern ``A^(1/T) / Σ A^(1/T)`` written out in float64; rows where ``row_valid`` is False get 0."""
    if source_is_scores:
        a_t = rules.tempered_softmax(source, temperature)
    else:
        weights = source.double().clamp_min(0) ** (1 / temperature)
        a_t = (weights / weights.sum(-1, keepdim=True)).nan_to_num(0.0).float()
    d_scores = rules.tsg_grad(a_t, grad)
    return d_scores if row_valid is None else d_scores * row_valid.unsqueeze(-1)


def run_both(source, grad, temperature, *, source_is_scores, row_valid=None, rtol=1e-5):
    """The kernel's dS and the rule's, checked equal (relative to the largest entry)."""
    out = kernel.tsg_backward(source, grad, temperature, source_is_scores=source_is_scores,
                              row_valid=row_valid)
    ref = tsg_rule(source, grad, temperature, source_is_scores=source_is_scores, row_valid=row_valid)
    assert_close_rel(out, ref, rtol)
    return out, ref


# --------------------------------------------------------------------------------------
# Basics
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("interpret", ["1", "0"])
def test_triton_available_follows_device_and_interpreter(interpret):
    """In a fresh process: available with ``TRITON_INTERPRET=1`` set before import, and without it only on CUDA."""
    env = {**os.environ, "TRITON_INTERPRET": interpret}
    code = "import torch, gim_tl.kernel as k; print(k.triton_available(), torch.cuda.is_available())"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    available, cuda = res.stdout.split()
    assert available == ("True" if interpret == "1" else cuda)


def test_import_without_triton_does_not_fail():
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "import gim_tl.kernel as k; assert not k.triton_available(); print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


@pytest.mark.parametrize("source_is_scores", [True, False], ids=["scores", "pattern"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.5])
@pytest.mark.parametrize("n_keys", [1, 3, 17, 33, 100])
def test_matches_reference_fp32(n_keys, temperature, source_is_scores):
    scores = _scores((2, 3, 5, n_keys), seed=n_keys)
    source = scores if source_is_scores else _pattern(scores)
    run_both(source, _grad(scores.shape), temperature, source_is_scores=source_is_scores)


@pytest.mark.parametrize("shape", [(7,), (1, 1), (300, 3), (2, 9, 1), (4, 2, 6, 129)])
def test_shapes_and_row_packing(shape):
    """1-D input, single keys, many short rows packed per program (partial last tile)."""
    scores = _scores(shape, seed=len(shape))
    for source_is_scores, source in ((True, scores), (False, _pattern(scores))):
        out, _ = run_both(source, _grad(shape), 2.0, source_is_scores=source_is_scores)
        assert out.is_contiguous()


def test_single_key_rows_are_zero():
    """One valid key: A_T = 1, so dS = 1·(g − g) = 0."""
    scores = _causal(_scores((2, 4, 4)), float("-inf"))  # query 0 sees only key 0
    out = kernel.tsg_backward(scores, _grad(scores.shape), 2.0, source_is_scores=True)
    assert torch.all(out[:, 0] == 0)


@pytest.mark.parametrize("source_is_scores", [True, False], ids=["scores", "pattern"])
def test_rows_sum_to_zero(source_is_scores):
    scores = _causal(_scores((3, 16, 16)), float("-inf"))
    source = scores if source_is_scores else _pattern(scores)
    out = kernel.tsg_backward(source, _grad(scores.shape), 2.0, source_is_scores=source_is_scores)
    assert out.sum(-1).abs().max() < 1e-6


# --------------------------------------------------------------------------------------
# Half inputs (compared with the reference fed the same half tensors)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("source_is_scores", [True, False], ids=["scores", "pattern"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.5])
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_half_inputs(dtype, temperature, source_is_scores):
    scores = _causal(_scores((2, 3, 17, 17), seed=3, dtype=dtype), torch.finfo(dtype).min)
    source = scores if source_is_scores else _pattern(scores)
    run_both(source, _grad(scores.shape, dtype=dtype), temperature, source_is_scores=source_is_scores)


@pytest.mark.parametrize("src_dtype,grad_dtype", [(torch.bfloat16, torch.float32),
                                                  (torch.float32, torch.float16)])
def test_mixed_dtypes(src_dtype, grad_dtype):
    scores = _scores((2, 5, 33), dtype=src_dtype)
    for source_is_scores, source in ((True, scores), (False, _pattern(scores))):
        run_both(source, _grad(scores.shape, dtype=grad_dtype), 2.0, source_is_scores=source_is_scores)


# --------------------------------------------------------------------------------------
# Masks, fully masked rows, row_valid
# --------------------------------------------------------------------------------------


MASKS = {
    "-inf": lambda dtype: float("-inf"),
    "finfo.min": lambda dtype: torch.finfo(dtype).min,
}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_causal_and_padded_scores(dtype, mask):
    """Causal mask plus two left-padded (fully masked) query rows; masked keys give exactly 0."""
    fill = MASKS[mask](dtype)
    scores = _causal(_scores((2, 3, 9, 9), dtype=dtype), fill)
    scores[:, :, :2] = fill  # fully masked rows
    grad = _grad(scores.shape, dtype=dtype)
    out, _ = run_both(scores, grad, 2.0, source_is_scores=True)
    assert torch.all(out[scores.float() <= torch.finfo(dtype).min / 2] == 0)
    assert torch.all(out[:, :, :2] == 0) and not out.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_pattern_fully_masked_rows_need_row_valid(dtype):
    """A bridge (finfo.min) fully masked row has a *uniform* pattern: only row_valid zeroes it."""
    scores = _causal(_scores((2, 2, 6, 6), dtype=dtype), torch.finfo(dtype).min)
    scores[:, :, :2] = torch.finfo(dtype).min
    pattern = _pattern(scores)
    assert torch.allclose(pattern[:, :, 0].float(), torch.full((2, 2, 6), 1 / 6), atol=1e-3)
    row_valid = torch.ones(scores.shape[:-1], dtype=torch.bool)
    row_valid[:, :, :2] = False
    grad = _grad(scores.shape, dtype=dtype)
    out, _ = run_both(pattern, grad, 2.0, source_is_scores=False, row_valid=row_valid)
    assert torch.all(out[:, :, :2] == 0)
    assert out[:, :, 2:].abs().sum() > 0
    # HookedTransformer's -inf mask gives an all-zero pattern row: zero output without row_valid.
    inf_pattern = _pattern(_causal(_scores((2, 6, 6)), float("-inf")))
    inf_pattern[:, :2] = 0
    out, _ = run_both(inf_pattern, _grad(inf_pattern.shape), 2.0, source_is_scores=False)
    assert torch.all(out[:, :2] == 0) and not out.isnan().any()


@pytest.mark.parametrize("source_is_scores", [True, False], ids=["scores", "pattern"])
def test_row_valid_random(source_is_scores):
    scores = _causal(_scores((2, 3, 11, 11)), float("-inf"))
    source = scores if source_is_scores else _pattern(scores)
    row_valid = torch.rand(scores.shape[:-1], generator=torch.Generator().manual_seed(4)) > 0.3
    out, _ = run_both(source, _grad(scores.shape), 3.5, source_is_scores=source_is_scores,
                      row_valid=row_valid)
    assert torch.all(out[~row_valid] == 0)
    assert out[row_valid].abs().sum() > 0


# --------------------------------------------------------------------------------------
# Rows longer than one block: the looped kernel
# --------------------------------------------------------------------------------------


@pytest.fixture
def small_blocks(monkeypatch):
    """Shrink the block constants so short rows take the looped path (several chunks + tail)."""
    monkeypatch.setattr(kernel, "MAX_FUSED_COLS", 32)
    monkeypatch.setattr(kernel, "LOOP_BLOCK", 16)


@pytest.mark.parametrize("source_is_scores", [True, False], ids=["scores", "pattern"])
@pytest.mark.parametrize("n_keys", [33, 100])
def test_looped_path_small_blocks(small_blocks, n_keys, source_is_scores):
    assert kernel._plan(4, n_keys).looped
    scores = _causal(_scores((2, 10, n_keys), seed=n_keys, spread=5.0), float("-inf"))
    scores[:, :3] = float("-inf")  # fully masked rows
    source = scores if source_is_scores else _pattern(scores)
    grad = _grad(scores.shape)
    for temperature in (1.0, 2.0, 3.5):
        out, _ = run_both(source, grad, temperature, source_is_scores=source_is_scores)
        assert torch.all(out[:, :3] == 0)
    row_valid = torch.rand(scores.shape[:-1], generator=torch.Generator().manual_seed(5)) > 0.5
    out, _ = run_both(source, grad, 2.0, source_is_scores=source_is_scores, row_valid=row_valid)
    assert torch.all(out[~row_valid] == 0)


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_looped_path_small_blocks_half(small_blocks, dtype):
    scores = _causal(_scores((2, 12, 50), dtype=dtype), torch.finfo(dtype).min)
    grad = _grad(scores.shape, dtype=dtype)
    run_both(scores, grad, 2.0, source_is_scores=True)
    run_both(_pattern(scores), grad, 2.0, source_is_scores=False)


@pytest.mark.parametrize("source_is_scores", [True, False], ids=["scores", "pattern"])
def test_row_longer_than_max_block(source_is_scores):
    """A real row of MAX_FUSED_COLS + 808 keys with the default constants.

    Row 0: dense. Row 1: only the last 5 keys valid (the first chunks are fully masked, so the
    running max starts at -inf). Row 2: fully masked. Row 3: valid keys only in the first chunk.
    """
    n_keys = kernel.MAX_FUSED_COLS + 808
    assert kernel._plan(4, n_keys).looped
    scores = _scores((4, n_keys), seed=7, spread=4.0)
    scores[1, :-5] = float("-inf")
    scores[2] = float("-inf")
    scores[3, 100:] = torch.finfo(torch.float32).min
    source = scores if source_is_scores else _pattern(scores)
    grad = _grad(scores.shape)
    for temperature in (1.0, 2.0, 3.5):
        out, ref = run_both(source, grad, temperature, source_is_scores=source_is_scores)
        assert torch.all(out[2] == 0) and torch.all(out[1, :-5] == 0) and torch.all(out[3, 100:] == 0)
        assert out[1, -5:].abs().sum() > 0


def test_row_at_max_block_is_fused():
    n_keys = kernel.MAX_FUSED_COLS
    assert not kernel._plan(2, n_keys).looped
    scores = _causal(_scores((3, n_keys), seed=8), float("-inf"))
    run_both(scores, _grad(scores.shape), 2.0, source_is_scores=True)


# --------------------------------------------------------------------------------------
# Non-contiguous inputs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("source_is_scores", [True, False], ids=["scores", "pattern"])
def test_non_contiguous(source_is_scores):
    base = _scores((2, 4, 12, 12), seed=9)
    base = base if source_is_scores else _pattern(base)
    grad = _grad((2, 4, 12, 12))
    views = {
        "transposed key dim": (base.transpose(-1, -2), grad.transpose(-1, -2)),
        "strided heads": (base[:, ::2], grad[:, ::2]),
        "key slice (row stride != key)": (base[..., :7], grad[..., :7]),
        "mixed": (base.transpose(1, 2), grad[..., :12].contiguous().transpose(1, 2)),
    }
    for name, (src, g) in views.items():
        assert not src.is_contiguous(), name
        run_both(src, g, 2.0, source_is_scores=source_is_scores)


def test_expanded_grad():
    scores = _scores((3, 5, 9))
    grad = _grad((1, 1, 9)).expand(3, 5, 9)
    run_both(scores, grad, 2.0, source_is_scores=True)


# --------------------------------------------------------------------------------------
# Independent check: autograd of a tempered softmax
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.5])
@pytest.mark.parametrize("n_keys", [5, 33])
def test_matches_autograd_times_temperature(n_keys, temperature):
    """dS = T · ∂/∂S Σ softmax(S/T) ⊙ g (autograd in fp64), on rows with a valid key."""
    scores = _causal(_scores((2, 3, n_keys, n_keys), seed=10 + n_keys), float("-inf"))
    scores[:, :, 0, 0] = float("-inf")  # one fully masked row per head: excluded below (NaN in autograd)
    grad = _grad(scores.shape)
    s64 = scores.double().requires_grad_(True)
    (torch.softmax(s64 / temperature, dim=-1) * grad.double()).sum().backward()
    expected = s64.grad * temperature
    out = kernel.tsg_backward(scores, grad, temperature, source_is_scores=True)
    rows = torch.isfinite(scores).any(-1)
    assert_close_rel(out[rows], expected[rows].float())
    assert torch.all(out[~rows] == 0)
    if temperature == 1.0:  # T = 1 is the plain softmax backward
        leaf = scores.clone().requires_grad_(True)
        torch.softmax(leaf, -1).backward(grad)
        assert_close_rel(out[rows], leaf.grad[rows])


# --------------------------------------------------------------------------------------
# Where recomputing A_T from the pattern is inexact: fp16
# --------------------------------------------------------------------------------------


def _model_rows(dtype):
    """Scores as a model of that dtype holds them, wide enough that fp16 patterns underflow.

    Row 0 has a key at exactly −17.375 below the max: ``A = e^-17.375 ≈ 2.8e-8`` is below half
    the smallest fp16 subnormal (2^-25 ≈ 3.0e-8) and rounds to 0 in an fp16 pattern.
    """
    scores = _causal(_scores((32, 40), seed=11, spread=7.0), float("-inf"))
    scores[0] = float("-inf")
    scores[0, :4] = torch.tensor([0.0, -17.375, -12.0, -3.0])
    return scores.to(dtype)


@pytest.mark.parametrize("temperature", [2.0, 3.5])
def test_fp16_pattern_loses_small_keys(temperature):
    """A_T from an fp16 pattern drops keys with tempered weight up to (2^-25)^(1/T).

    Errors are measured against A_T from the same model's scores (the exact tempered pattern of
    that forward pass). fp16 pattern: keys with ``A < 2^-25`` vanish (100 % relative error on
    keys worth up to ≈1.7e-4 at T = 2, ≈7e-3 at T = 3.5). bf16 and fp32 patterns: no key is
    lost; the per-key relative error is the dtype's rounding (≤ 2^-7/T for bf16, ~1e-6 fp32).
    """
    worst = {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        scores = _model_rows(dtype)
        exact = tempered_pattern(scores, temperature, source_is_scores=True)
        from_pattern = tempered_pattern(_pattern(scores), temperature, source_is_scores=False)
        keys = exact > 1e-12
        rel = ((from_pattern - exact).abs() / exact)[keys]
        dropped = keys & (from_pattern == 0)
        worst[dtype] = (rel.max().item(), exact[dropped].max().item() if dropped.any() else 0.0)

        # The kernel shows the same thing in dS: the dropped key gets no gradient from the pattern.
        grad = _grad(scores.shape, dtype=dtype)
        ds_scores = kernel.tsg_backward(scores, grad, temperature, source_is_scores=True)
        ds_pattern = kernel.tsg_backward(_pattern(scores), grad, temperature, source_is_scores=False)
        if dtype == torch.float16:
            assert ds_pattern[0, 1] == 0 and ds_scores[0, 1].abs() > 0
            assert dropped[0, 1]

    bound = 2.0 ** (-25 / temperature)  # |x^(1/T) − y^(1/T)| ≤ |x − y|^(1/T), and Σ A^(1/T) ≥ 1
    rel16, lost16 = worst[torch.float16]
    assert rel16 == 1.0  # some key lost entirely
    assert 0.5 * bound < lost16 < bound  # ...worth ≈1.7e-4 (T=2) / ≈7e-3 (T=3.5)
    rel_bf16, lost_bf16 = worst[torch.bfloat16]
    assert lost_bf16 == 0.0 and rel_bf16 <= 2.0 ** -7 / temperature  # unit roundoff 2^-8, twice
    rel32, lost32 = worst[torch.float32]
    assert lost32 == 0.0 and rel32 < 1e-5


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def test_validation_errors():
    s = _scores((2, 3, 4))
    g = _grad((2, 3, 4))
    call = kernel.tsg_backward
    with pytest.raises(ValueError, match="grad shape"):
        call(s, g[..., :3], 2.0, source_is_scores=True)
    with pytest.raises(ValueError, match="dtype"):
        call(s.double(), g, 2.0, source_is_scores=True)
    with pytest.raises(ValueError, match="dtype"):
        call(s, g.to(torch.int32), 2.0, source_is_scores=True)
    with pytest.raises(ValueError, match="row_valid must be a bool"):
        call(s, g, 2.0, source_is_scores=True, row_valid=torch.ones(2, 3))
    with pytest.raises(ValueError, match="row_valid shape"):
        call(s, g, 2.0, source_is_scores=True, row_valid=torch.ones(2, 4, dtype=torch.bool))
    for bad in (0.0, -1.0, float("nan"), float("inf"), "two"):
        with pytest.raises(ValueError, match="temperature"):
            call(s, g, bad, source_is_scores=True)
    with pytest.raises(ValueError, match="at least one dim"):
        call(torch.tensor(1.0), torch.tensor(1.0), 2.0, source_is_scores=True)
    with pytest.raises(ValueError, match="grad on meta"):
        call(s, g.to("meta"), 2.0, source_is_scores=True)


def test_cpu_tensors_need_interpreter(monkeypatch):
    monkeypatch.setattr(kernel, "_interpret_mode", lambda: False)
    with pytest.raises(ValueError, match="CUDA tensors"):
        kernel.tsg_backward(_scores((2, 4)), _grad((2, 4)), 2.0, source_is_scores=True)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (2, 0, 4)])
def test_empty(shape):
    out = kernel.tsg_backward(torch.zeros(shape), torch.zeros(shape), 2.0, source_is_scores=True)
    assert out.shape == shape and out.dtype == torch.float32


# --------------------------------------------------------------------------------------
# GPU compile check (no GPU needed): the kernels must lower to PTX/SASS for sm_90
# --------------------------------------------------------------------------------------


_COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
from triton.runtime.jit import JITFunction
from gim_tl import kernel

assert kernel._load_triton()
target = GPUTarget("cuda", 90, 32)
types = {"src_ptr": "*bf16", "g_ptr": "*fp16", "out_ptr": "*fp32", "valid_ptr": "*u8",
         "n_rows": "i32", "n_cols": "i32", "src_row_stride": "i32", "g_row_stride": "i32",
         "scale": "fp32", "mask_thresh": "fp32"}

def build(fn, consts, num_warps):
    sig = {name: types.get(name, "constexpr") for name in fn.arg_names}
    triton.compile(ASTSource(fn, sig, consts), target=target, options={"num_warps": num_warps})

fused = JITFunction(kernel._tsg_fused_kernel)
looped = JITFunction(kernel._tsg_looped_kernel)
for scores_src, has_valid in ((True, False), (False, True)):
    flags = {"SOURCE_IS_SCORES": scores_src, "HAS_ROW_VALID": has_valid}
    for n_rows, n_cols in ((4096, 3), (4096, 100), (64, kernel.MAX_FUSED_COLS)):
        plan = kernel._plan(n_rows, n_cols)
        build(fused, {**flags, "BLOCK_M": plan.block_m, "BLOCK_N": plan.block_n}, plan.num_warps)
    plan = kernel._plan(64, kernel.MAX_FUSED_COLS + 1)
    build(looped, {**flags, "BLOCK_N": plan.block_n}, plan.num_warps)
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """The interpreter accepts code the GPU compiler rejects: compile every variant for sm_90.

    Needs no GPU (triton ships ptxas). Runs in a fresh process without ``TRITON_INTERPRET``,
    because the interpreter leaves ``triton.language`` patched for the rest of this one.
    """
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton's bundled ptxas not found; cannot compile for sm_90 here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True,
                         timeout=300, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-4000:]
