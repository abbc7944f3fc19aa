# Copyright 2026 The MobileMoE for Hugging Face contributors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Regenerate the bundled multiple-choice evaluation set (the lm-eval task `mobilemoe_toy_facts`, see DATA_CARD.md).

    python modeling_mobilemoe/resources/eval/generate_eval.py

writes `toy_facts.jsonl` next to this file (`{"question", "choices", "answer", "category"}` a line), byte for byte the
same on every run (fixed seed, standard library only). The facts come from the tables of
`../corpus/generate_corpus.py`, imported rather than copied, and every kept question's right answer is checked to be
stated in the shipped corpus files (`../corpus/*.txt`) by a regular expression; the wrong choices are other values of
the same attribute, phrased the same way.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import sys


HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS_DIR = os.path.join(os.path.dirname(HERE), "corpus")
OUTPUT = os.path.join(HERE, "toy_facts.jsonl")
NUM_CHOICES = 4
ARITHMETIC_ITEMS = 30  # per operation

sys.path.insert(0, CORPUS_DIR)
import generate_corpus as C  # noqa: E402  (its word lists, fact tables and number words)


def corpus_text() -> str:
    return "\n".join(open(path, encoding="utf-8").read() for path in sorted(glob.glob(os.path.join(CORPUS_DIR, "*.txt"))))


def legs_text(legs: int) -> str:
    return "no legs" if legs == 0 else f"{C.words(legs)} legs"


def categories() -> list[tuple[str, list[tuple[str, str, str]]]]:
    """[(category, items)], an item being (question, the value it asks for, a regular expression that finds the
    fact in the corpus, a function phrasing any value of the category as the answer sentence)."""
    out = []
    animals = C.ANIMALS
    a = C.with_article

    def animal_items(field: int, evidence: str):
        return [(animal, animal[field], evidence.format(name=animal[0], value=re.escape(str(animal[field])), a=a(animal[0])))
                for animal in animals]

    for category, field, question, phrase, evidence in (
        ("animal_sound", 2, "What sound does {a} make?", "{A} {value}.", r"The {name} {value}\."),
        ("animal_food", 3, "What does {a} eat?", "{A} eats {value}.", r"The {name} \w[\w ]*\. It eats {value} and"),
        ("animal_home", 4, "Where does {a} live?", "{A} lives in {value}.", r"The {name} [^.]*\. It eats [^.]* lives in {value}\."),
        ("animal_baby", 7, "What is a baby {name} called?", "A baby {name} is called {article_value}.",
         r"A baby {name} is called (a|an) {value}\."),
        ("animal_covering", 6, "What covers the body of {a}?", "The body of {a} is covered with {value}.",
         r"The {name} [^.]*\. It eats [^.]*\. [^.]* its body is covered with {value}\."),
    ):  # fmt: skip
        items = []
        for animal, value, pattern in animal_items(field, evidence):
            name = animal[0]
            items.append(
                (
                    question.format(a=a(name), name=name),
                    value,
                    pattern,
                    lambda v, name=name, phrase=phrase: phrase.format(
                        A=C.cap(a(name)), a=a(name), name=name, value=v, article_value=a(v)
                    ),
                )
            )
        out.append((category, items))

    items = []
    for animal in animals:
        name, legs = animal[0], animal[5]
        items.append(
            (
                f"How many legs does {a(name)} have?",
                legs_text(legs),
                rf"(?i){re.escape(a(name))} has {re.escape(legs_text(legs))}\b",
                lambda v, name=name: f"{C.cap(a(name))} has {v}.",
            )
        )
    out.append(("animal_legs", items))

    out.append(
        (
            "color_of_thing",
            [
                (f"What color is {thing}?", color, rf"{re.escape(C.cap(thing))} is {color}, not",
                 lambda v, thing=thing: f"{C.cap(thing)} is {v}.")
                for thing, color in C.COLORED_THINGS
            ],
        )
    )  # fmt: skip
    out.append(
        (
            "color_mix",
            [
                (f"What color do you get when you mix {first} paint with {second} paint?", result,
                 rf"When you mix {first} paint with {second} paint, you get {result}\.", lambda v: f"You get {v}.")
                for first, second, result in C.MIXES
            ],
        )
    )  # fmt: skip
    days, months = C.DAYS, C.MONTHS
    # The neighbours of a day or month: (category, names, unit, direction, step, evidence of item i).
    for category, names, unit, direction, step, evidence in (
        ("day_after", days, "day", "after", 1,
         lambda i: rf"Today is {days[i]}\. Yesterday was \w+ and tomorrow will be {days[(i + 1) % 7]}\."),
        ("day_before", days, "day", "before", -1, lambda i: rf"Today is {days[i]}\. Yesterday was {days[i - 1]} "),
        ("month_after", months, "month", "after", 1,
         lambda i: rf"{months[i]} comes after \w+ and before {months[(i + 1) % 12]}\."),
    ):  # fmt: skip
        items = [
            (f"What {unit} comes {direction} {names[i]}?", names[(i + step) % len(names)], evidence(i),
             lambda v, i=i, names=names, unit=unit, direction=direction: f"The {unit} {direction} {names[i]} is {v}.")
            for i in range(len(names))
        ]  # fmt: skip
        out.append((category, items))
    out.append(
        (
            "month_days",
            [
                (f"How many days does {months[i]} usually have?", str(C.MONTH_DAYS[i]),
                 rf"{months[i]} usually has {C.MONTH_DAYS[i]} days\.", lambda v, i=i: f"{months[i]} usually has {v} days.")
                for i in range(12)
            ],
        )
    )  # fmt: skip
    for category, table, noun in (("shape_sides", C.SHAPES, "sides"), ("vehicle_wheels", C.VEHICLES, "wheels")):
        items = [
            (f"How many {noun} does {a(thing)} have?", C.words(count),
             rf"{re.escape(C.cap(a(thing)))} has {C.words(count)} {noun}\.",
             lambda v, thing=thing, noun=noun: f"{C.cap(a(thing))} has {v} {noun}.")
            for thing, count in table
        ]  # fmt: skip
        out.append((category, items))
    out.append(
        (
            "job_does",
            [
                (f"What does {a(job)} do?", does, rf"{re.escape(C.cap(a(job)))} {re.escape(does)}\.",
                 lambda v, job=job: f"{C.cap(a(job))} {v}.")
                for job, does, _ in C.JOBS
            ],
        )
    )  # fmt: skip
    return out


def arithmetic(rng: random.Random, text: str) -> list[dict]:
    """Sums and products the corpus states in digits, with near-miss wrong results."""
    items = []
    for operation, symbol, word, compute, pattern in (
        ("addition", "+", "plus", lambda x, y: x + y, r"\b(\d{1,2}) \+ (\d{1,2}) = (\d+)\b"),
        ("multiplication", "×", "times", lambda x, y: x * y, r"\b(\d{1,2}) groups of (\d{1,2}) make (\d+)\b"),
    ):
        stated = sorted({(int(x), int(y)) for x, y, z in re.findall(pattern, text) if compute(int(x), int(y)) == int(z)})
        for x, y in rng.sample(stated, ARITHMETIC_ITEMS):
            right = compute(x, y)
            near = [right + d for d in (-10, -2, -1, 1, 2, 10) if right + d >= 0]
            values = [right, *rng.sample(near, NUM_CHOICES - 1)]
            rng.shuffle(values)
            items.append(
                {
                    "question": f"What is {x} {word} {y}?",
                    "choices": [f"{x} {word} {y} is {v}." for v in values],
                    "answer": values.index(right),
                    "category": operation,
                }
            )
    return items


def build() -> list[dict]:
    rng = random.Random(0)
    text = corpus_text()
    rows = []
    for category, items in categories():
        values = sorted({value for _, value, _, _ in items})
        for question, value, evidence, phrase in items:
            if not re.search(evidence, text):
                continue  # not stated in the shipped corpus: not asked
            wrong = [v for v in values if v != value]
            picked = [value, *rng.sample(wrong, min(NUM_CHOICES - 1, len(wrong)))]
            rng.shuffle(picked)
            choices = [phrase(v) for v in picked]
            assert len(set(choices)) == len(choices), question
            rows.append({"question": question, "choices": choices, "answer": picked.index(value), "category": category})
    rows += arithmetic(rng, text)
    return rows


def main() -> None:
    rows = build()
    with open(OUTPUT, "w", encoding="utf-8", newline="\n") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["category"]] = counts.get(row["category"], 0) + 1
    print(f"wrote {len(rows)} questions to {OUTPUT}: {counts}")


if __name__ == "__main__":
    main()
