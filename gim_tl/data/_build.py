"""Regenerate ``factual_recall.jsonl`` and ``ioi.jsonl`` from the hand-written tables below.

Run from the repository root: ``python -m gim_tl.data._build``. The output is deterministic.
``sentiment.jsonl`` and ``fact_check.jsonl`` are hand-written directly and are not generated here.
Not imported by the package; kept so the structured data sets can be audited and rebuilt.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

# --------------------------------------------------------------------------------------
# Factual recall: groups of (template, [(subject, answer), ...]). Each row's counterfactual
# is the next subject of the same group (cyclically), so clean and corrupt prompts differ
# in the subject only. Subjects in a group have equal word and token counts (no subject
# starts a prompt: a sentence-initial word has no leading space and tokenizes differently);
# answers of neighbouring rows differ.
# --------------------------------------------------------------------------------------

FACT_GROUPS: list[tuple[str, list[tuple[str, str]]]] = [
    (
        "The capital of {} is",
        [
            ("France", "Paris"),
            ("Italy", "Rome"),
            ("Germany", "Berlin"),
            ("Spain", "Madrid"),
            ("Japan", "Tokyo"),
            ("Russia", "Moscow"),
            ("England", "London"),
            ("China", "Beijing"),
            ("Egypt", "Cairo"),
            ("Greece", "Athens"),
            ("Ireland", "Dublin"),
            ("Austria", "Vienna"),
            ("Norway", "Oslo"),
            ("Sweden", "Stockholm"),
            ("Canada", "Ottawa"),
            ("Portugal", "Lisbon"),
            ("Hungary", "Budapest"),
            ("Korea", "Seoul"),
        ],
    ),
    (
        "The city of {} is in the country of",
        [
            ("Paris", "France"),
            ("Tokyo", "Japan"),
            ("Rome", "Italy"),
            ("Berlin", "Germany"),
            ("Athens", "Greece"),
            ("Vienna", "Austria"),
            ("Moscow", "Russia"),
            ("Dublin", "Ireland"),
            ("Madrid", "Spain"),
            ("Cairo", "Egypt"),
        ],
    ),
    (
        "The people of {} speak",
        [
            ("France", "French"),
            ("Spain", "Spanish"),
            ("Italy", "Italian"),
            ("Japan", "Japanese"),
            ("Russia", "Russian"),
            ("Brazil", "Portuguese"),
            ("Germany", "German"),
            ("Turkey", "Turkish"),
            ("Portugal", "Portuguese"),
            ("Mexico", "Spanish"),
            ("Greece", "Greek"),
            ("China", "Chinese"),
        ],
    ),
    (
        "The {} is in the city of",
        [
            ("Louvre", "Paris"),
            ("Kremlin", "Moscow"),
            ("Acropolis", "Athens"),
            ("Pantheon", "Rome"),
        ],
    ),
    (
        "The {} is in the city of",
        [
            ("Colosseum", "Rome"),
            ("Parthenon", "Athens"),
        ],
    ),
    (
        "The {} is located in the city of",
        [
            ("Eiffel Tower", "Paris"),
            ("Brandenburg Gate", "Berlin"),
        ],
    ),
    (
        "The {} is in the country of",
        [
            ("Kremlin", "Russia"),
            ("Acropolis", "Greece"),
            ("Louvre", "France"),
        ],
    ),
    (
        "The {} is in the country of",
        [
            ("Great Wall", "China"),
            ("Taj Mahal", "India"),
        ],
    ),
    (
        "The chemical symbol for {} is",
        [
            ("gold", "Au"),
            ("iron", "Fe"),
            ("oxygen", "O"),
            ("silver", "Ag"),
            ("copper", "Cu"),
            ("hydrogen", "H"),
            ("sodium", "Na"),
        ],
    ),
    (
        "The sky is blue and the {} is",
        [
            ("grass", "green"),
            ("snow", "white"),
            ("night", "dark"),
        ],
    ),
    (
        "The largest {} on Earth is the",
        [
            ("ocean", "Pacific"),
            ("desert", "Sahara"),
        ],
    ),
    (
        "The longest river in {} is the",
        [
            ("Africa", "Nile"),
            ("Brazil", "Amazon"),
        ],
    ),
    (
        "The currency of the United {} is the",
        [
            ("States", "dollar"),
            ("Kingdom", "pound"),
        ],
    ),
    (
        "A baby {} is called a",
        [
            ("cat", "kitten"),
            ("cow", "calf"),
            ("dog", "puppy"),
            ("sheep", "lamb"),
        ],
    ),
    (
        "The opposite of {} is",
        [
            ("hot", "cold"),
            ("up", "down"),
            ("big", "small"),
            ("day", "night"),
            ("fast", "slow"),
            ("black", "white"),
            ("left", "right"),
            ("wet", "dry"),
            ("good", "bad"),
            ("rich", "poor"),
            ("open", "closed"),
            ("true", "false"),
            ("top", "bottom"),
            ("north", "south"),
            ("young", "old"),
            ("strong", "weak"),
        ],
    ),
    (
        "There are {} in a",
        [
            ("seven days", "week"),
            ("twelve months", "year"),
        ],
    ),
]


def build_factual_recall() -> list[dict[str, str]]:
    rows = []
    for template, items in FACT_GROUPS:
        for i, (subject, answer) in enumerate(items):
            c_subject, c_answer = items[(i + 1) % len(items)]
            rows.append(
                {
                    "prompt": template.format(subject),
                    "answer": " " + answer,
                    "corrupt_prompt": template.format(c_subject),
                    "corrupt_answer": " " + c_answer,
                }
            )
    return rows


# --------------------------------------------------------------------------------------
# IOI: templates with slots {A} {B} (the two names introduced), {S2} (the repeated subject),
# {PLACE} and {OBJ}. Clean prompts repeat the subject at {S2}; the ABC counterfactual puts a
# third name there, so the indirect object is no longer determined. "ABBA" rows name the
# indirect object first ("When Mary and John ..., John gave ... to" -> " Mary"); "BABA" rows
# name the subject first ("When John and Mary ..., John gave ... to" -> " Mary").
# --------------------------------------------------------------------------------------

IOI_TEMPLATES: dict[str, str] = {
    "t1": "When {A} and {B} went to the {PLACE}, {S2} gave a {OBJ} to",
    "t2": "After {A} and {B} arrived at the {PLACE}, {S2} handed a {OBJ} to",
    "t3": "While {A} and {B} were waiting at the {PLACE}, {S2} gave a {OBJ} to",
    "t4": "Later, {A} and {B} walked to the {PLACE}. {S2} gave a {OBJ} to",
    "t5": "Then, {A} and {B} had a long argument. Afterwards, {S2} said to",
    "t6": "When {A} and {B} got a {OBJ} at the {PLACE}, {S2} decided to give it to",
    "t7": "On Sunday, {A} and {B} had a picnic at the {PLACE}. {S2} offered a {OBJ} to",
    "t8": "The {PLACE} was busy when {A} and {B} arrived, so {S2} passed a {OBJ} to",
}

IOI_NAMES = [
    "Mary", "John", "Tom", "Anna", "James", "Sarah", "Mike", "Lisa", "David", "Emma",
    "Paul", "Kate", "Mark", "Laura", "Peter", "Rachel", "Daniel", "Amy", "Chris", "Emily",
    "Steve", "Julia", "Ben", "Susan", "Eric", "Karen", "Adam", "Jane", "Jack", "Alice",
]
IOI_PLACES = [
    "store", "park", "school", "office", "beach", "market",
    "library", "restaurant", "station", "garden", "hospital", "museum",
]
IOI_OBJECTS = ["drink", "book", "ball", "gift", "letter", "key", "pen", "ring", "cake", "bag", "flower", "hat"]
IOI_PER_TEMPLATE = 12  # 6 ABBA + 6 BABA per template
IOI_SEED = 20240601


def build_ioi() -> list[dict[str, str]]:
    rng = random.Random(IOI_SEED)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for tid, template in IOI_TEMPLATES.items():
        n = 0
        while n < IOI_PER_TEMPLATE:
            io, s, c = rng.sample(IOI_NAMES, 3)
            order = "ABBA" if n % 2 == 0 else "BABA"
            a, b = (io, s) if order == "ABBA" else (s, io)
            slots = {"A": a, "B": b, "PLACE": rng.choice(IOI_PLACES), "OBJ": rng.choice(IOI_OBJECTS)}
            prompt = template.format(S2=s, **slots)
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append(
                {
                    "prompt": prompt,
                    "answer": " " + io,
                    "distractor": " " + s,
                    "corrupt_prompt": template.format(S2=c, **slots),
                    "corrupt_name": " " + c,
                    "template": tid,
                    "order": order,
                }
            )
            n += 1
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    write_jsonl(HERE / "factual_recall.jsonl", build_factual_recall())
    write_jsonl(HERE / "ioi.jsonl", build_ioi())


if __name__ == "__main__":
    main()
