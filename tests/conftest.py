"""Shared test setup: offline mode, and one cached tiny model per family / HookedTransformer variant."""

from __future__ import annotations

import functools
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
