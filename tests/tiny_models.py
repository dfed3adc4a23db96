"""Tiny random models for tests, built offline: HF configs wrapped by TransformerBridge (TL 4 and
3.9) and HookedTransformer from a HookedTransformerConfig (TL 3.9 only)."""

from __future__ import annotations

import warnings

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

VOCAB = 64
PAD_ID = 3


def toy_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``<bos> <eos> <unk> <pad> w4 … w{V-1}``, with no Hub access."""
    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2, "<pad>": 3, **{f"w{i}": i for i in range(4, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                unk_token="<unk>", pad_token="<pad>")
    # TL pops init_kwargs["name_or_path"] and re-loads by name unless add_bos_token is set.
    t.init_kwargs.update(name_or_path="toy", add_bos_token=True)
    return t


def _hf_config(family: str):
    from transformers import Gemma2Config, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=PAD_ID)
    if family == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, max_position_embeddings=64, **common)
    if family == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=64, **common)
    if family == "gemma2":
        return Gemma2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                            attn_logit_softcapping=5.0, final_logit_softcapping=None,
                            query_pre_attn_scalar=8, sliding_window=64, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.0, resid_pdrop=0.0,
                          embd_pdrop=0.0, **common)
    raise ValueError(family)


BRIDGE_FAMILIES = ("llama", "qwen2", "gemma2", "gpt2")


def hf_model(family: str, seed: int = 0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_hf_config(family), attn_implementation="eager")
    # Random init gives tiny norm weights and near-uniform attention; spread them so rules matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.3 * torch.randn_like(p))
            elif p.ndim >= 2:
                p.mul_(3.0)
    return model.to(dtype).eval()


def bridge(family: str, seed: int = 0, dtype=torch.float32):
    """A TransformerBridge over a tiny random HF model of ``family``."""
    from transformer_lens.model_bridge import TransformerBridge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = TransformerBridge.boot_transformers(f"local/tiny-{family}", hf_model=hf_model(family, seed, dtype),
                                                tokenizer=toy_tokenizer(), device="cpu")
    return m.eval()


HT_VARIANTS = ("gpt2_like", "llama_like", "gemma_like", "llama_fold_ln", "gpt2_fold_ln")


def hooked_transformer(variant: str, seed: int = 0, dtype=torch.float32):
    """A TL 3.9 HookedTransformer with random weights (MHA/GQA, rotary/learned, LN/RMS, gated or not)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    base = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_vocab=VOCAB, n_ctx=64, seed=seed, dtype=dtype,
                device="cpu", default_prepend_bos=False)
    if variant.startswith("gpt2"):
        cfg = dict(base, d_mlp=64, act_fn="gelu", normalization_type="LN", positional_embedding_type="standard")
    elif variant.startswith("llama"):
        cfg = dict(base, d_mlp=48, act_fn="silu", gated_mlp=True, normalization_type="RMS", final_rms=True,
                   positional_embedding_type="rotary", rotary_dim=8, n_key_value_heads=2)
    elif variant == "gemma_like":
        cfg = dict(base, d_mlp=48, act_fn="gelu_pytorch_tanh", gated_mlp=True, normalization_type="RMS",
                   final_rms=True, positional_embedding_type="rotary", rotary_dim=8, n_key_value_heads=2,
                   attn_scores_soft_cap=5.0, use_normalization_before_and_after=True)
    else:
        raise ValueError(variant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(HookedTransformerConfig(**cfg), tokenizer=None)
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".w") and p.ndim == 1:
                    p.add_(0.3 * torch.randn_like(p))
                elif p.ndim >= 2:
                    p.mul_(3.0)
        if variant.endswith("fold_ln"):
            state = model.state_dict()
            model.cfg.normalization_type = "LNPre" if model.cfg.normalization_type == "LN" else "RMSPre"
            model2 = HookedTransformer(model.cfg, tokenizer=None)
            model2.load_and_process_state_dict(state, fold_ln=True, center_writing_weights=False,
                                               center_unembed=False)
            model = model2
    return model.eval()
