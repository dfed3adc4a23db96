"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import platform
from pathlib import Path

#: glibc allocator settings under which a process keeps the memory it frees: large blocks come from the heap
#: (no fresh ``mmap`` per block), and the heap is never trimmed back to the OS. Once the first passes have grown
#: the heap, later passes reuse it with no page faults, whatever ran before them (as with jemalloc or tcmalloc,
#: which PyTorch's CPU performance guide recommends). Passed through the environment to a fresh process.
RETAIN_FREED_MEMORY = {
    "MALLOC_MMAP_THRESHOLD_": str(4 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
    "MALLOC_TOP_PAD_": str(1 << 30),
}


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo), for the results tables."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def token_ids(tok, text: str) -> list[int]:
    """``text``'s token ids, no special tokens."""
    return list(tok(text, add_special_tokens=False)["input_ids"])


def correct_pairs(model, rows, wrong_field: str) -> tuple[list[tuple[list[int], list[int], int, int]], int]:
    """Prompt pairs fit for patching: clean and corrupt of equal token length, one-token answer and wrong
    answer (``row.<wrong_field>``), and a clean top-1 equal to the answer.

    Returns ``([(clean ids, corrupt ids, answer id, wrong id), ...] in file order, number of candidates)``.
    """
    import torch

    tok = model.tokenizer
    candidates = []
    for row in rows:
        clean, corrupt = token_ids(tok, row.prompt), token_ids(tok, row.corrupt_prompt)
        answer, wrong = token_ids(tok, row.answer), token_ids(tok, getattr(row, wrong_field))
        if len(clean) == len(corrupt) and len(answer) == 1 and len(wrong) == 1:
            candidates.append((clean, corrupt, answer[0], wrong[0]))
    correct = set()
    with torch.no_grad():
        for length in sorted({len(c[0]) for c in candidates}):
            index = [i for i, c in enumerate(candidates) if len(c[0]) == length]
            top = model(torch.tensor([candidates[i][0] for i in index]))[:, -1].argmax(-1).tolist()
            correct.update(i for i, t in zip(index, top, strict=True) if t == candidates[i][2])
    return [c for i, c in enumerate(candidates) if i in correct], len(candidates)
