"""Small prompt data sets that ship with ``gim_tl`` (no downloads).

Four JSON Lines files, all written by hand for this package (see ``README.md`` here):

* ``sentiment.jsonl``: short movie / product reviews, ``label`` "Yes" (positive) or "No".
* ``fact_check.jsonl``: simple factual statements, ``label`` "Yes" (true) or "No".
* ``factual_recall.jsonl``: one-token completions with a subject-swapped counterfactual.
* ``ioi.jsonl``: indirect-object-identification prompts with an ABC counterfactual.

The loaders return lists of frozen dataclasses. The two classification sets are meant to be
asked through the chat template of SmolLM2-135M-Instruct with :func:`chat_yes_no_prompt`;
the assistant's answer tokens are ``"Yes"`` / ``"No"`` **without** a leading space.
The fixed few-shot demonstrations (:data:`SENTIMENT_SHOTS`, :data:`FACT_CHECK_SHOTS`) are not
among the evaluation rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any, Literal, Protocol

__all__ = [
    "YES_NO_ANSWERS",
    "YES_NO_INSTRUCTION",
    "SENTIMENT_QUESTION",
    "FACT_CHECK_QUESTION",
    "SENTIMENT_SHOTS",
    "FACT_CHECK_SHOTS",
    "YesNoExample",
    "FactualRecallExample",
    "IOIExample",
    "load_sentiment",
    "load_fact_check",
    "load_factual_recall",
    "load_ioi",
    "chat_yes_no_prompt",
    "text_char_span",
]

YesNo = Literal["Yes", "No"]

#: The two answer strings of the classification tasks, as the assistant writes them
#: (no leading space: right after ``<|im_start|>assistant\n``). Index 0 is the positive class.
YES_NO_ANSWERS: tuple[str, str] = ("Yes", "No")

#: The instruction that :func:`chat_yes_no_prompt` puts in every user message.
YES_NO_INSTRUCTION = "Answer with Yes or No."

SENTIMENT_QUESTION = "Is this review positive?"
FACT_CHECK_QUESTION = "Is this statement true?"

#: Few-shot demonstrations (text, label), alternating Yes / No; ``SENTIMENT_SHOTS[:2]`` is a
#: balanced 2-shot set. None of these texts occurs in ``sentiment.jsonl``.
SENTIMENT_SHOTS: tuple[tuple[str, YesNo], ...] = (
    ("The pizza cutter is sharp, sturdy and easy to wash. Very pleased with it.", "Yes"),
    ("The plot was so dull that I fell asleep halfway through.", "No"),
    ("A joyful musical with catchy songs and lovely costumes.", "Yes"),
    ("The hair dryer stopped blowing hot air after two weeks.", "No"),
)

#: Few-shot demonstrations (text, label), alternating Yes / No; ``FACT_CHECK_SHOTS[:2]`` is a
#: balanced 2-shot set. None of these texts occurs in ``fact_check.jsonl``.
FACT_CHECK_SHOTS: tuple[tuple[str, YesNo], ...] = (
    ("Oslo is the capital of Norway.", "Yes"),
    ("Sheep can breathe fire.", "No"),
    ("Grass is usually green.", "Yes"),
    ("A day has fifty hours.", "No"),
)


# --------------------------------------------------------------------------------------
# Example types
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class YesNoExample:
    """A text to classify; ``label`` is the expected answer token string ("Yes" or "No")."""

    text: str
    label: YesNo

    @property
    def is_yes(self) -> bool:
        return self.label == "Yes"


@dataclass(frozen=True)
class FactualRecallExample:
    """A one-token completion and its subject-swapped counterfactual.

    ``answer`` / ``corrupt_answer`` carry the leading space (``" Paris"``). ``prompt`` and
    ``corrupt_prompt`` have no trailing space, the same template and the same number of
    words; with the SmolLM2 tokenizer they have the same number of tokens and both answers
    are single tokens.
    """

    prompt: str
    answer: str
    corrupt_prompt: str
    corrupt_answer: str


@dataclass(frozen=True)
class IOIExample:
    """An indirect-object-identification prompt.

    ``answer`` is the indirect object and ``distractor`` the subject (both with a leading
    space; single SmolLM2 tokens). ``corrupt_prompt`` replaces the second mention of the
    subject by a third name ``corrupt_name`` (ABC counterfactual), so the answer is no longer
    determined; it has the same number of words and tokens as ``prompt``. ``order`` is
    "ABBA" when the indirect object is named first, "BABA" when the subject is.
    """

    prompt: str
    answer: str
    distractor: str
    corrupt_prompt: str
    corrupt_name: str
    template: str
    order: Literal["ABBA", "BABA"]


# --------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------


def _read_jsonl(name: str) -> tuple[dict[str, Any], ...]:
    text = files(__name__).joinpath(name).read_text(encoding="utf-8")
    return tuple(json.loads(line) for line in text.splitlines() if line.strip())


@cache
def _load_yes_no(name: str) -> tuple[YesNoExample, ...]:
    return tuple(YesNoExample(text=r["text"], label=r["label"]) for r in _read_jsonl(name))


def load_sentiment() -> list[YesNoExample]:
    """Reviews for "Is this review positive?" (label "Yes" = positive)."""
    return list(_load_yes_no("sentiment.jsonl"))


def load_fact_check() -> list[YesNoExample]:
    """Statements for "Is this statement true?" (label "Yes" = true)."""
    return list(_load_yes_no("fact_check.jsonl"))


@cache
def _load_factual_recall() -> tuple[FactualRecallExample, ...]:
    return tuple(FactualRecallExample(**r) for r in _read_jsonl("factual_recall.jsonl"))


def load_factual_recall() -> list[FactualRecallExample]:
    """One-token factual completions ("The capital of France is" -> " Paris")."""
    return list(_load_factual_recall())


@cache
def _load_ioi() -> tuple[IOIExample, ...]:
    return tuple(IOIExample(**r) for r in _read_jsonl("ioi.jsonl"))


def load_ioi() -> list[IOIExample]:
    """IOI prompts ("When Mary and John went to the store, John gave a drink to" -> " Mary")."""
    return list(_load_ioi())


# --------------------------------------------------------------------------------------
# Chat prompts
# --------------------------------------------------------------------------------------


class ChatTokenizer(Protocol):
    def apply_chat_template(self, conversation: Any, /, *args: Any, **kwargs: Any) -> Any: ...


def _user_message(text: str, question: str) -> str:
    return f"{question} {YES_NO_INSTRUCTION}\n\n{text}"


def chat_yes_no_prompt(
    tokenizer: ChatTokenizer,
    text: str,
    question: str,
    shots: Iterable[tuple[str, str]] = (),
    *,
    system: str | None = None,
) -> str:
    """A chat-template prompt string that asks ``question`` about ``text``.

    Each user turn reads ``"{question} Answer with Yes or No.\\n\\n{text}"``; each shot
    ``(text, label)`` becomes an earlier user turn followed by an assistant turn ``label``.
    The string ends with the generation prompt, so the next token is the answer
    (``"Yes"`` / ``"No"``, no leading space, for SmolLM2). ``system`` adds a system message;
    without it the tokenizer's template decides (SmolLM2's inserts its default system prompt).
    Tokenize the result with ``add_special_tokens=False`` if the tokenizer would add a BOS
    token that the template already contains (SmolLM2's adds none).
    """
    messages: list[dict[str, str]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    for shot_text, label in shots:
        messages.append({"role": "user", "content": _user_message(shot_text, question)})
        messages.append({"role": "assistant", "content": label})
    messages.append({"role": "user", "content": _user_message(text, question)})
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise TypeError(f"apply_chat_template returned {type(prompt).__name__}, expected str")
    return prompt


def text_char_span(prompt: str, text: str) -> tuple[int, int]:
    """Character span ``(start, end)`` of the evaluated ``text`` inside a chat prompt.

    Uses the last occurrence, i.e. the final user turn (few-shot texts come earlier). Map it
    to token positions with a fast tokenizer's ``return_offsets_mapping=True`` to restrict an
    attribution ranking to the review / statement.
    """
    start = prompt.rfind(text)
    if start < 0:
        raise ValueError("text does not occur in prompt")
    return start, start + len(text)

