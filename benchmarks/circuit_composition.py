"""Which readers the top edges of each EAP variant go to, on SmolLM2's IOI prompts (to explain §5's ranking).

For EAP with plain gradients, full GIM and each GIM rule alone, prints the share of q, k, v, MLP and logits
readers among the top 1 % of edges by |score|, and the median |score| of each reader type relative to plain EAP.
Run (TL 3.9 venv): ``HF_HUB_OFFLINE=1 .venv39/bin/python benchmarks/circuit_composition.py [--n-examples 4]``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from circuits import one_batch  # noqa: E402

from gim_tl import GIMHookSet  # noqa: E402
from gim_tl.data import load_ioi  # noqa: E402
from gim_tl.models import load_model  # noqa: E402
from gim_tl.patching import eap, logit_diff_metric  # noqa: E402

PRESETS = ("plain", "gim", "tsg", "freeze_norm", "grad_norm")


def reader_type(target: str) -> str:
    return target[-2] if target.endswith(">") else ("logits" if target == "logits" else "mlp")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-examples", type=int, default=4)
    parser.add_argument("--top", type=float, default=0.01)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(backend="hooked")
    batch = one_batch(model, load_ioi(), "distractor", args.n_examples)
    metric = logit_diff_metric(batch.answer, batch.wrong)
    kinds = ("q", "k", "v", "mlp", "logits")
    print(f"| method | top {args.top:.0%}: " + " / ".join(kinds) + " | median abs score vs plain: "
          + " / ".join(kinds) + " |\n|---|---|---|")
    plain_median = None
    for preset in PRESETS:
        edges = eap(model, batch.clean, batch.corrupt, metric, hook_set=GIMHookSet.preset(preset))
        types = [reader_type(t) for t in edges.targets]
        col_kind = torch.tensor([kinds.index(t) for t in types])
        exists = ~edges.scores.isnan()
        kind_grid = col_kind[None, :].expand_as(edges.scores)[exists]
        scores = edges.scores[exists].abs()
        top = scores.argsort(descending=True)[: int(args.top * scores.numel())]
        share = [float((kind_grid[top] == i).float().mean()) for i in range(len(kinds))]
        median = [float(scores[kind_grid == i].median()) for i in range(len(kinds))]
        plain_median = plain_median or median
        print(f"| {edges.method} | " + " / ".join(f"{s:.2f}" for s in share) + " | "
              + " / ".join(f"{m / p:.2f}" for m, p in zip(median, plain_median, strict=True)) + " |", flush=True)


if __name__ == "__main__":
    main()
