"""Edge patching of ``gim_tl.circuits`` against the ``auto-circuit`` library on a tiny random HookedTransformer.

auto-circuit (PyPI ``auto-circuit`` 1.0.1) patches edges the same way (reader input += Σ over patched edges of
corrupt − current source output). Both are run on the same clean/corrupt batch with random sets of patched
edges; the script prints the largest difference in the metric. auto-circuit 1.0.1 imports
``transformer_lens.HookedTransformerKeyValueCache``, which TL 3.9 renamed ``TransformerLensKeyValueCache`` (and
moved its module); the script aliases both before importing auto-circuit (in this process only).

Run in an environment with TL 3.9 and auto-circuit installed without its dependencies (it pins kaleido and
pulls plotly, tracr, word2word): ``python benchmarks/vs_auto_circuit.py``.
"""

from __future__ import annotations

import re
import sys
import types
import warnings
from pathlib import Path

import torch
import transformer_lens

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
warnings.filterwarnings("ignore")
transformer_lens.HookedTransformerKeyValueCache = transformer_lens.TransformerLensKeyValueCache
_shim = types.ModuleType("transformer_lens.past_key_value_caching")
_shim.HookedTransformerKeyValueCache = transformer_lens.TransformerLensKeyValueCache
sys.modules.setdefault("transformer_lens.past_key_value_caching", _shim)

import tiny_models  # noqa: E402
from auto_circuit.types import AblationType  # noqa: E402
from auto_circuit.utils.ablation_activations import src_ablations  # noqa: E402
from auto_circuit.utils.graph_utils import patch_mode, patchable_model  # noqa: E402

from gim_tl.circuits import Circuit  # noqa: E402
from gim_tl.patching import eap, logit_diff_metric  # noqa: E402


def our_name(edge) -> str:
    """auto-circuit's ``A0.1->A1.2.Q`` / ``Resid Start->MLP 1`` / ``MLP 0->Resid End`` in eap()'s names."""
    def node(name: str) -> str:
        if name == "Resid Start":
            return "input"
        if name == "Resid End":
            return "logits"
        if m := re.fullmatch(r"MLP (\d+)", name):
            return f"m{m[1]}"
        m = re.fullmatch(r"A(\d+)\.(\d+)(?:\.([QKV]))?", name)
        return f"a{m[1]}.h{m[2]}" + (f"<{m[3].lower()}>" if m[3] else "")
    return f"{node(edge.src.name)}->{node(edge.dest.name)}"


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = tiny_models.hooked_transformer("gpt2_like")
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(4, 64, (3, 6), generator=g)
    corrupt = clean.clone()
    corrupt[:, 1:4] = torch.randint(4, 64, (3, 3), generator=g)
    metric = logit_diff_metric([5, 6, 7], [8, 9, 10])
    edges = eap(model, clean, corrupt, metric)

    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    pm = patchable_model(model, factorized=True, slice_output=None, separate_qkv=True, device=torch.device("cpu"))
    names = {our_name(e): e for e in pm.edges}
    assert set(names) == set(Circuit.full(edges).edge_names), "the two graphs differ"
    patch_src = src_ablations(pm, corrupt, AblationType.RESAMPLE)
    worst = 0.0
    for trial, fraction in enumerate((0.0, 0.05, 0.3, 0.7, 1.0)):
        rng = torch.Generator().manual_seed(trial)
        all_names = sorted(names)
        patched = [n for n in all_names if torch.rand((), generator=rng) < fraction]
        with torch.no_grad(), patch_mode(pm, patch_src, edges=[names[n] for n in patched]):
            theirs = float(metric(pm(clean)))
        model.set_use_attn_result(False)
        ours = Circuit.full(edges).without(*patched).run(model, clean, corrupt, metric)
        model.set_use_attn_result(True)
        worst = max(worst, abs(theirs - ours))
        print(f"{len(patched):4d} of {len(all_names)} edges patched: auto-circuit {theirs:+.6f}, gim_tl {ours:+.6f}")
    print(f"largest difference: {worst:.2e}")


if __name__ == "__main__":
    main()
