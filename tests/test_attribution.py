"""``gim_tl.attribution.attribute_tokens`` against references written here with TL hooks and autograd.

The references capture the token embeddings with a forward hook at ``hook_embed`` and their gradient
with a TL *backward* hook there (after ``metric.backward()``), with GIM attached by
``GIMHookSet.attach`` — a different capture route from the library's (a fresh leaf + ``autograd.grad``).

Run on both TL versions::

    .venv/bin/python -m pytest tests/test_attribution.py -q      # TL 4.x: TransformerBridge
    .venv39/bin/python -m pytest tests/test_attribution.py -q    # TL 3.9: + HookedTransformer
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import contextlib  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import tiny_models  # noqa: E402
import torch  # noqa: E402
from conftest import needs_hooked, needs_smollm2  # noqa: E402

from gim_tl import GIMHookSet  # noqa: E402
from gim_tl.attribution import (  # noqa: E402
    METHODS,
    TokenAttribution,
    attribute_tokens,
    compare,
    resolve_positions,
    riemann_alphas,
)

MODELS = [*(f"bridge:{f}" for f in tiny_models.BRIDGE_FAMILIES),
          *(pytest.param(f"hooked:{v}", marks=needs_hooked) for v in ("llama_like", "gpt2_like", "gemma_like"))]
TOKENS = torch.tensor([[5, 9, 12, 20, 33, 7], [40, 8, 61, 17, 4, 29]])
TARGET = 11
ATOL = 1e-5   # same math, different capture route: float rounding only
PAD_ATOL = 1e-4  # left padding changes the masked softmax's summation order (logits differ by ~4e-7)

_cache: dict[str, object] = {}


def tiny(name: str):
    """Tiny random model ``"bridge:<family>"`` or ``"hooked:<variant>"``, built once per session."""
    if name not in _cache:
        kind, which = name.split(":")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _cache[name] = tiny_models.bridge(which) if kind == "bridge" else tiny_models.hooked_transformer(which)
    return _cache[name]


def hook_embed_value(model, tokens):
    """The ``hook_embed`` activation for ``tokens``, read with a forward hook."""
    seen = {}

    def keep(x, hook):
        seen["x"] = x.detach().clone()

    with torch.no_grad(), model.hooks(fwd_hooks=[("hook_embed", keep)]):
        model(tokens)
    return seen["x"]


def reference_scores(model, tokens, baseline_embeds, target, contrast=None, gim: GIMHookSet | None = None):
    """Σ_d (e − e′)·g with g read by a TL backward hook at hook_embed after ``metric.backward()``."""
    seen = {}

    def keep_value(x, hook):
        seen["e"] = x.detach().clone()

    def keep_grad(g, hook):
        seen["g"] = g.detach().clone()

    model.zero_grad(set_to_none=True)
    hooks = dict(fwd_hooks=[("hook_embed", keep_value)], bwd_hooks=[("hook_embed", keep_grad)])
    attach = gim.attach(model) if gim is not None else contextlib.nullcontext()
    with attach, model.hooks(**hooks):
        logits = model(tokens)[:, -1]
        metric = logits[:, target]
        if contrast is not None:
            metric = metric - logits[:, contrast]
        metric.sum().backward()
    model.zero_grad(set_to_none=True)
    return ((seen["e"] - baseline_embeds) * seen["g"]).sum(-1), metric.detach()


def other_token_baseline(model, tokens, token_id=4):
    """A baseline tensor [d_model]: the embedding of ``token_id`` (away from 0, where norms are singular)."""
    return hook_embed_value(model, torch.tensor([[token_id]]))[0, 0]


# --------------------------------------------------------------------------------------
# Gradient methods equal the direct computation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_gim_equals_hookset_plus_autograd(name):
    model = tiny(name)
    base = other_token_baseline(model, TOKENS)
    ref, metric = reference_scores(model, TOKENS, base, TARGET, gim=GIMHookSet())
    got = attribute_tokens(model, TOKENS, TARGET, method="gim", baseline=base)
    torch.testing.assert_close(got.scores, ref, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(got.metric_values, metric, atol=ATOL, rtol=0)
    plain, _ = reference_scores(model, TOKENS, base, TARGET)
    assert (ref - plain).abs().max() > 1e-3, "GIM must differ from plain gradients on these models"


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", ["plain", "grad_x_input"])
def test_plain_equals_autograd(name, method):
    model = tiny(name)
    base = other_token_baseline(model, TOKENS)
    ref, _ = reference_scores(model, TOKENS, base, TARGET)
    got = attribute_tokens(model, TOKENS, TARGET, method=method, baseline=base)
    torch.testing.assert_close(got.scores, ref, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("preset", ["tsg", "freeze_norm", "grad_norm+tsg"])
def test_presets_equal_their_hookset(preset):
    model = tiny("bridge:llama")
    ref, _ = reference_scores(model, TOKENS, torch.zeros(()), TARGET, gim=GIMHookSet.preset(preset))
    got = attribute_tokens(model, TOKENS, TARGET, method=preset, baseline="zero")
    torch.testing.assert_close(got.scores, ref, atol=ATOL, rtol=1e-4)


def test_custom_hook_set_is_used():
    model = tiny("bridge:llama")
    gim = GIMHookSet(temperature=4.0)
    ref, _ = reference_scores(model, TOKENS, torch.zeros(()), TARGET, gim=GIMHookSet(temperature=4.0))
    got = attribute_tokens(model, TOKENS, TARGET, baseline="zero", hook_set=gim)
    torch.testing.assert_close(got.scores, ref, atol=ATOL, rtol=1e-4)
    assert not gim.report().missing


def test_pad_baseline_is_the_pad_embedding():
    model = tiny("bridge:gpt2")  # GPT-2's pad row is not zero-initialized
    pad = hook_embed_value(model, torch.full((1, 1), tiny_models.PAD_ID))[0, 0]
    assert pad.abs().max() > 0
    ref, _ = reference_scores(model, TOKENS, pad, TARGET, gim=GIMHookSet())
    got = attribute_tokens(model, TOKENS, TARGET, baseline="pad")
    torch.testing.assert_close(got.scores, ref, atol=ATOL, rtol=1e-4)
    assert got.baseline == "pad"


def test_argmax_target_by_default():
    model = tiny("bridge:qwen2")
    with torch.no_grad():
        expected = model(TOKENS)[:, -1].argmax(-1)
    got = attribute_tokens(model, TOKENS, baseline="zero")
    assert torch.equal(got.target_ids, expected)
    assert got.target_strs == [model.tokenizer.decode([int(t)]) for t in expected]


def test_string_prompts_and_targets():
    model = tiny("bridge:llama")
    got = attribute_tokens(model, "w5 w9 w12", "w11", baseline="zero")
    ref = attribute_tokens(model, torch.tensor([[5, 9, 12]]), 11, baseline="zero")
    assert got.tokens == [["w5", "w9", "w12"]]
    assert got.target_strs == ["w11"] and int(got.target_ids[0]) == 11
    torch.testing.assert_close(got.scores, ref.scores, atol=0, rtol=0)


# --------------------------------------------------------------------------------------
# Contrast, padding, positions
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gim", "grad_x_input"])
def test_contrast_is_difference_of_single_targets(method):
    """The gradient is linear in the metric, so attr(a − b) = attr(a) − attr(b)."""
    model = tiny("bridge:gemma2")
    both = attribute_tokens(model, TOKENS, TARGET, contrast=[30, 42], method=method, baseline="zero")
    a = attribute_tokens(model, TOKENS, TARGET, method=method, baseline="zero")
    b = attribute_tokens(model, TOKENS, [30, 42], method=method, baseline="zero")
    torch.testing.assert_close(both.scores, a.scores - b.scores, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(both.metric_values, a.metric_values - b.metric_values, atol=ATOL, rtol=0)
    assert both.contrast_ids.tolist() == [30, 42] and both.contrast_strs == ["w30", "w42"]


@pytest.mark.parametrize("name", ["bridge:llama", "bridge:gpt2", pytest.param("hooked:llama_like", marks=needs_hooked)])
@pytest.mark.parametrize("method", ["gim", "grad_x_input"])
def test_left_padded_batch_equals_per_example(name, method):
    model = tiny(name)
    rows = [[5, 9, 12, 20, 33, 7], [40, 8, 61], [17, 4, 29, 50]]
    width = max(map(len, rows))
    tokens = torch.full((len(rows), width), tiny_models.PAD_ID)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    base = other_token_baseline(model, tokens)
    batched = attribute_tokens(model, tokens, TARGET, attention_mask=mask, method=method, baseline=base)
    assert torch.equal(batched.mask, mask.bool())
    assert torch.all(batched.scores[~batched.mask] == 0)
    assert batched.position.tolist() == [width - 1] * len(rows)
    for i, row in enumerate(rows):
        single = attribute_tokens(model, torch.tensor([row]), TARGET, method=method, baseline=base)
        torch.testing.assert_close(batched.scores[i, width - len(row):], single.scores[0], atol=PAD_ATOL, rtol=1e-3)
        torch.testing.assert_close(batched.metric_values[i], single.metric_values[0], atol=PAD_ATOL, rtol=0)


def test_string_batch_is_left_padded():
    model = tiny("bridge:llama")
    got = attribute_tokens(model, ["w5 w9 w12 w20", "w40 w8"], TARGET, baseline="zero")
    assert got.mask.tolist() == [[True] * 4, [False, False, True, True]]
    single = attribute_tokens(model, "w40 w8", TARGET, baseline="zero")
    torch.testing.assert_close(got.scores[1, 2:], single.scores[0], atol=PAD_ATOL, rtol=1e-3)
    assert got.real_tokens(1) == ["w40", "w8"]


def test_right_padding_explains_last_real_token():
    model = tiny("bridge:qwen2")
    tokens = torch.tensor([[5, 9, 12, 20], [40, 8, tiny_models.PAD_ID, tiny_models.PAD_ID]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    got = attribute_tokens(model, tokens, TARGET, attention_mask=mask, baseline="zero")
    assert got.position.tolist() == [3, 1]
    single = attribute_tokens(model, torch.tensor([[40, 8]]), TARGET, baseline="zero")
    torch.testing.assert_close(got.scores[1, :2], single.scores[0], atol=PAD_ATOL, rtol=1e-3)
    assert got.scores[1, 2:].abs().max() == 0


def test_resolve_positions_counts_real_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert resolve_positions(mask, -1).tolist() == [4, 2, 4]
    assert resolve_positions(mask, 0).tolist() == [2, 0, 0]
    assert resolve_positions(mask, 1).tolist() == [3, 1, 1]
    with pytest.raises(ValueError, match="out of range for example 0, which has 3 tokens"):
        resolve_positions(mask, 3)


def test_other_position():
    model = tiny("bridge:llama")
    got = attribute_tokens(model, TOKENS, TARGET, position=2, baseline="zero")
    ref = attribute_tokens(model, TOKENS[:, :3], TARGET, baseline="zero")
    torch.testing.assert_close(got.scores[:, :3], ref.scores, atol=ATOL, rtol=1e-4)
    assert got.scores[:, 3:].abs().max() < 1e-6  # later tokens cannot affect position 2 (causal)


# --------------------------------------------------------------------------------------
# Integrated gradients
# --------------------------------------------------------------------------------------


def embeds_forward(model, tokens, embeds, target):
    """f with ``hook_embed`` replaced by ``embeds`` (last position, target logit)."""
    with torch.no_grad(), model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: embeds.to(x.dtype))]):
        return model(tokens)[:, -1, target]


def test_riemann_alphas_are_midpoints():
    assert riemann_alphas(4).tolist() == [0.125, 0.375, 0.625, 0.875]


@pytest.mark.parametrize("name", ["bridge:llama", "bridge:gpt2"])
def test_ig_completeness(name):
    """Σ scores = f(x) − f(x′) up to the midpoint rule's O(1/steps²) error.

    Measured relative error at 64 steps: 5e-5 (llama), 3e-4 (gpt2); 16 steps give ~16× more.
    The baseline is another token's embedding: the pad row of HF Llama is zero, where RMSNorm is
    singular and the path integral does not converge.
    """
    model = tiny(name)
    base = other_token_baseline(model, TOKENS)
    got = attribute_tokens(model, TOKENS, TARGET, method="integrated_gradients", baseline=base,
                           ig_keep_first=False, ig_steps=64, ig_batch_size=64)
    f_x = embeds_forward(model, TOKENS, hook_embed_value(model, TOKENS), TARGET)
    f_base = embeds_forward(model, TOKENS, base.expand(*TOKENS.shape, -1), TARGET)
    torch.testing.assert_close(got.metric_values, f_x, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.scores.sum(-1), f_x - f_base, rtol=2e-3, atol=2e-4)
    assert got.details["ig_rule"] == "midpoint"


def test_ig_keep_first_fixes_position_zero():
    """With ig_keep_first the first real token is not interpolated: score 0 there, and completeness
    holds against the baseline input whose first token is the real one."""
    model = tiny("bridge:llama")
    tokens = torch.tensor([[tiny_models.PAD_ID, 5, 9, 12, 20], [40, 8, 61, 17, 4]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    base = other_token_baseline(model, tokens)
    got = attribute_tokens(model, tokens, TARGET, attention_mask=mask, method="integrated_gradients",
                           baseline=base, ig_steps=64, ig_batch_size=48)
    assert got.scores[0, :2].abs().max() == 0 and got.scores[1, 0] == 0
    real = hook_embed_value(model, tokens)
    mixed = base.expand_as(real).clone()
    mixed[0, 1], mixed[1, 0] = real[0, 1], real[1, 0]

    def f(embeds):
        with torch.no_grad(), model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: embeds)]):
            return model(tokens, attention_mask=mask)[:, -1, TARGET]

    expected = f(real) - f(mixed)
    torch.testing.assert_close(got.scores.sum(-1), expected, rtol=2e-3, atol=2e-4)


def test_ig_batch_size_does_not_change_result():
    model = tiny("bridge:qwen2")
    a = attribute_tokens(model, TOKENS, TARGET, method="integrated_gradients", baseline="zero", ig_steps=6,
                         ig_batch_size=1)
    b = attribute_tokens(model, TOKENS, TARGET, method="integrated_gradients", baseline="zero", ig_steps=6,
                         ig_batch_size=5)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------
# Result object and errors
# --------------------------------------------------------------------------------------


def test_result_fields_and_indexing():
    model = tiny("bridge:llama")
    got = attribute_tokens(model, TOKENS, TARGET, baseline="zero")
    assert isinstance(got, TokenAttribution) and len(got) == 2
    assert got.scores.dtype == torch.float32 and got.scores.device.type == "cpu"
    assert got.tokens[1] == [f"w{t}" for t in TOKENS[1].tolist()]
    one = got[-1]
    assert len(one) == 1 and torch.equal(one.scores[0], got.scores[1]) and one.tokens == [got.tokens[1]]
    with pytest.raises(IndexError):
        got[2]
    assert set(METHODS) >= {"gim", "tsg", "grad_x_input", "integrated_gradients"} and "plain" not in METHODS


def test_compare_checks_same_prompts():
    model = tiny("bridge:llama")
    a = attribute_tokens(model, TOKENS, TARGET, baseline="zero")
    b = attribute_tokens(model, TOKENS, TARGET, method="grad_x_input", baseline="zero")
    c = compare(a, b)
    assert c.labels == ["GIM", "Gradient × Input"] and len(c) == 2
    other = attribute_tokens(model, TOKENS, 12, baseline="zero")
    with pytest.raises(ValueError, match="same prompts"):
        compare(a, other)


def test_errors():
    model = tiny("bridge:llama")
    with pytest.raises(ValueError, match="empty"):
        attribute_tokens(model, "", TARGET, baseline="zero")
    with pytest.raises(ValueError, match="empty"):
        attribute_tokens(model, ["w4 w5", ""], TARGET, baseline="zero")
    with pytest.raises(ValueError, match=r"target 'w4 w5' is 2 tokens"):
        attribute_tokens(model, "w4 w5", "w4 w5", baseline="zero")
    with pytest.raises(ValueError, match="more than the model's context of 64"):
        attribute_tokens(model, torch.full((1, 65), 5), TARGET, baseline="zero")
    with pytest.raises(ValueError, match="does not broadcast"):
        attribute_tokens(model, TOKENS, TARGET, baseline=torch.zeros(5, 32))
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] have no real token"):
        attribute_tokens(model, TOKENS, TARGET, attention_mask=torch.tensor([[1] * 6, [0] * 6]), baseline="zero")
    with pytest.raises(ValueError, match="encodes ' ' as 0 tokens"):
        attribute_tokens(model, TOKENS, TARGET, baseline="space")
    with pytest.raises(ValueError, match="unknown method"):
        attribute_tokens(model, TOKENS, TARGET, method="lrp")
    with pytest.raises(ValueError, match="2 entries for 1 example"):
        attribute_tokens(model, TOKENS[:1], [1, 2], baseline="zero")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        attribute_tokens(model, TOKENS, 64, baseline="zero")


def test_errors_without_tokenizer(monkeypatch):
    model = tiny("bridge:llama")
    monkeypatch.setattr(model, "tokenizer", None)
    with pytest.raises(ValueError, match="no tokenizer"):
        attribute_tokens(model, "w4 w5", TARGET, baseline="zero")
    with pytest.raises(ValueError, match="no tokenizer"):
        attribute_tokens(model, TOKENS, "w4", baseline="zero")
    got = attribute_tokens(model, TOKENS, TARGET, baseline="zero")  # token ids still work
    assert got.tokens[0][0] == "<5>" and got.target_strs[0] == f"<{TARGET}>"


@needs_hooked
def test_hooked_transformer_without_tokenizer_rejects_text():
    model = tiny("hooked:llama_like")
    assert model.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer"):
        attribute_tokens(model, "The capital", TARGET, baseline="zero")


# --------------------------------------------------------------------------------------
# SmolLM2: the real model (slow)
# --------------------------------------------------------------------------------------

PROMPT = "The capital of France is"
#: Bridge vs HookedTransformer: TL 3.9 re-implements the forward, so logits differ by rounding (~4e-5 over the
#: vocabulary). Measured on this prompt: max |Δ score| 2e-6 (GIM) and 2e-5 (plain), |Δ logit(' Paris')| 8e-6.
BACKEND_ATOL = 2e-4


@pytest.mark.slow
@needs_smollm2
def test_smollm2_top1_is_paris_and_gim_runs(smollm2_bridge):
    got = attribute_tokens(smollm2_bridge, PROMPT)
    assert got.target_strs == [" Paris"]
    assert got.tokens[0] == ["The", " capital", " of", " France", " is"]
    assert torch.isfinite(got.scores).all() and got.scores.abs().max() > 0
    with pytest.raises(ValueError, match="is 2 tokens"):
        attribute_tokens(smollm2_bridge, PROMPT, " France is")


@pytest.mark.slow
@needs_smollm2
@needs_hooked
def test_smollm2_bridge_and_hooked_agree(smollm2_bridge, smollm2_hooked):
    a = attribute_tokens(smollm2_bridge, PROMPT, " Paris")
    b = attribute_tokens(smollm2_hooked, PROMPT, " Paris")
    assert a.target_strs == b.target_strs == [" Paris"]
    torch.testing.assert_close(b.scores, a.scores, atol=BACKEND_ATOL, rtol=0)
    torch.testing.assert_close(b.metric_values, a.metric_values, atol=1e-4, rtol=0)


def test_float_target_is_a_clear_type_error():
    model = tiny("bridge:llama")
    with pytest.raises(TypeError, match=r"target must be a token id.*got float 3.0\. Did you mean target=3\?"):
        attribute_tokens(model, TOKENS, 3.0)
    with pytest.raises(TypeError, match="contrast must be a token id.*float32 tensor"):
        attribute_tokens(model, TOKENS, 3, contrast=torch.tensor([3.0, 4.0]))


def test_plain_is_a_deprecated_name_of_grad_x_input():
    """One name per method: "plain" still works, warns, and gives the grad_x_input result, labelled as such."""
    model = tiny("bridge:llama")
    new = attribute_tokens(model, TOKENS, TARGET, method="grad_x_input", baseline="zero")
    with pytest.warns(DeprecationWarning, match="'plain' is deprecated.*'grad_x_input'"):
        old = attribute_tokens(model, TOKENS, TARGET, method="plain", baseline="zero")
    assert old.method == new.method == "grad_x_input" and torch.equal(old.scores, new.scores)
    with pytest.warns(UserWarning, match="appears twice with equal scores"):
        both = compare(new, old)
    assert both.labels == ["Gradient × Input"]   # not "Gradient × Input (2)"


def test_hook_set_names_the_result_and_must_agree_with_method():
    """hook_set=None means method's set; a given set labels the result by its preset (or "custom")."""
    model = tiny("bridge:llama")
    by_name = attribute_tokens(model, TOKENS, TARGET, method="tsg", baseline="zero")
    by_set = attribute_tokens(model, TOKENS, TARGET, hook_set=GIMHookSet.preset("tsg"), baseline="zero")
    assert by_name.method == by_set.method == "tsg" and torch.equal(by_name.scores, by_set.scores)
    custom = attribute_tokens(model, TOKENS, TARGET, hook_set=GIMHookSet(v_scale=0.3), baseline="zero")
    assert custom.method == "custom" and custom.label == "custom GIM set"
    plain = attribute_tokens(model, TOKENS, TARGET, hook_set=GIMHookSet.preset("plain"), baseline="zero")
    assert plain.method == "grad_x_input"
    with pytest.raises(ValueError, match="disagree"):
        attribute_tokens(model, TOKENS, TARGET, method="freeze_norm", hook_set=GIMHookSet.preset("tsg"))


def test_show_progress_is_a_deprecated_name_of_progress(capsys):
    model = tiny("bridge:llama")
    with pytest.warns(DeprecationWarning, match=r"show_progress=\.\.\.\) is deprecated.*progress="):
        attribute_tokens(model, TOKENS, TARGET, method="integrated_gradients", ig_steps=2, baseline="zero",
                         show_progress=True)
    assert "integrated gradients" in capsys.readouterr().err   # the bar was shown
    attribute_tokens(model, TOKENS, TARGET, method="integrated_gradients", ig_steps=2, baseline="zero", progress=True)
    assert "integrated gradients" in capsys.readouterr().err
    with pytest.raises(ValueError, match="disagree"):
        attribute_tokens(model, TOKENS, TARGET, method="integrated_gradients", ig_steps=2, baseline="zero",
                         progress=False, show_progress=True)
