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
"""Regenerate the bundled long documents for the mid-training (context extension) demo (see DATA_CARD.md).

    python modeling_mobilemoe/resources/long/generate_long.py

writes `train.jsonl` and `heldout.jsonl` (`{"text": ...}` a line) next to this file, byte for byte the same on every
run (fixed seeds, standard library only). Each document (3,000 to 8,000 characters of simple English, paragraphs
separated by `\\n`) states a few facts at its start (prices on a shopping list, a pet's name, a secret number, a list
of words, a weekly plan, ...) and refers back to them after long stretches of filler: sentences written by the
templates of `../corpus/generate_corpus.py` (imported, with its word lists). The stretches are 700 to 2,800 characters,
about 200 to 800 tokens of the shipped tokenizer, so a model that sees 256 tokens at a time cannot predict most of the
references and one that sees 1,024 can. A fact is restated before it is more than MAX_GAP characters old, so every
reference has its source within about 1,000 tokens.
"""

from __future__ import annotations

import json
import os
import random
import sys


HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS_DIR = os.path.join(os.path.dirname(HERE), "corpus")


sys.dont_write_bytecode = True  # importing the corpus generator must not leave __pycache__ in the shipped resources
sys.path.insert(0, CORPUS_DIR)
import generate_corpus as C  # noqa: E402  (its word lists, fact tables and templates)


words, cap, with_article = C.words, C.cap, C.with_article

MIN_GAP, MAX_FILLER_GAP = 700, 2800  # characters of filler between two references
MAX_GAP = 3200  # a fact is restated before its last mention is further back than this
OVERSHOOT = 600  # filler may run past its gap by up to one paragraph
MENTION = 300  # characters of a typical mention
MIN_CHARS, MAX_CHARS = 3000, 8000  # documents outside these lengths are drawn again
MAX_REF_GAP = 3800  # and so are those with a fact further back than this (never with these settings, in practice)
# filler: the corpus templates, stories and everyday life more often than sums
FILLERS = [C.story_doc] * 3 + [C.everyday_doc] * 3 + [C.nature_doc] * 2 + [C.time_doc] * 2 + [C.arithmetic_doc]
PET_NAMES = ["Biscuit", "Pepper", "Muffin", "Pebble", "Sunny", "Ziggy", "Mango", "Noodle", "Button", "Maple"]
PET_NAMES += ["Clover", "Pickle", "Shadow", "Toffee", "Bubbles", "Rocky", "Daisy", "Comet", "Hazel", "Olive"]
TOWNS = ["Millbrook", "Oakfield", "Redhill", "Stonebridge", "Greenwater", "Applewood", "Kingsford", "Fairport"]
TOWNS += ["Westmoor", "Bluebay", "Elmstead", "Sandholm", "Larkspur", "Northgate", "Riverton", "Hollowell"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth"]
ORDINALS += ["eleventh", "twelfth"]
STALLS = ["At the next stall", "A little later", "Near the fountain", "At a busy stall", "Before going home"]
CLUBS = ["garden club", "reading club", "chess club", "music club", "walking club", "cooking club", "art club"]


def filler(rng: random.Random, n_chars: int) -> list[str]:
    """Paragraphs of one or two corpus-style documents, at least `n_chars` characters in all."""
    paragraphs, size = [], 0
    while size < n_chars:
        paragraph = " ".join(rng.choice(FILLERS)(rng) for _ in range(rng.randint(1, 2)))
        paragraphs.append(paragraph)
        size += len(paragraph) + 1
    return paragraphs


def price(value: float) -> str:
    return f"${value:.2f}"


def join_and(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


class Kind:
    """One kind of long document: its facts (keys), the opening that states them all, a mention of some of them, and
    the closing that recalls them all."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    keys: list[str]

    def title(self) -> str:
        raise NotImplementedError

    def opening(self) -> list[str]:
        raise NotImplementedError

    def mention(self, keys: list[str], index: int) -> str:
        raise NotImplementedError

    def closing(self) -> str:
        raise NotImplementedError


class Shopping(Kind):
    def __init__(self, rng):
        super().__init__(rng)
        self.name, self.friend = rng.sample(C.NAMES, 2)
        self.day = rng.choice(C.DAYS)
        foods = rng.sample(C.FOODS, rng.randint(5, 8))
        self.prices = {food: rng.randint(1, 9) + rng.choice([0, 0.25, 0.5, 0.75]) for food in foods}
        self.keys = foods

    def title(self):
        return f"{self.name}'s shopping list"

    def opening(self):
        lines = [f"{food}: {price(value)}" for food, value in self.prices.items()]
        return [
            (
                f"On {self.day} morning, {self.name} wrote a shopping list for the market. Next to each thing on the "
                f"list, {self.name} wrote its price."
            ),
            "The list said: " + "; ".join(lines) + ".",
            f"{self.name} put the list in a pocket and walked to the market with {self.friend}.",
        ]

    def mention(self, keys, index):
        bought = join_and([f"the {food} for {price(self.prices[food])}" for food in keys])
        where = "At the first stall" if index == 0 else self.rng.choice(STALLS)
        return f"{where}, {self.name} looked at the list again and bought {bought}."

    def closing(self):
        total = sum(self.prices.values())
        listing = ", ".join(f"the {food} cost {price(value)}" for food, value in self.prices.items())
        return (
            f"Back at home, {self.name} and {self.friend} checked the list one more time: {listing}. "
            f"Altogether the shopping cost {price(total)}, just as the list said."
        )


class Story(Kind):
    def __init__(self, rng):
        super().__init__(rng)
        self.hero, self.friend = rng.sample(C.NAMES, 2)
        self.animal = rng.choice([a for a in C.ANIMALS if a[0] not in ("whale", "spider", "bee", "lion", "snake")])
        self.pet = rng.choice(PET_NAMES)
        self.town = rng.choice(TOWNS)
        self.food = rng.choice(C.FOODS)
        self.job = rng.choice(C.JOBS)
        self.color, self.thing = rng.choice(C.COLORS), rng.choice(C.OBJECTS)
        self.keys = ["pet", "town", "food", "friend", "thing"]

    def title(self):
        return f"The story of {self.hero} and {self.pet}"

    def opening(self):
        name, _, sound, *_ = self.animal
        return [
            (
                f"This is a story about {self.hero}, who lived in a small town called {self.town}. {self.hero} had "
                f"{with_article(self.animal[0])} named {self.pet}. {self.pet} the {name} {sound} every morning."
            ),
            (
                f"{self.hero}'s best friend was {self.friend}, {with_article(self.job[0])}. "
                f"{cap(with_article(self.job[0]))} {self.job[1]}, and {self.friend} worked at {self.job[2]}."
            ),
            (
                f"The food {self.hero} liked best was {self.food}. {self.hero} also had {with_article(self.color)} "
                f"{self.thing} that was very special."
            ),
        ]

    def mention(self, keys, index):
        name, _, sound, *_ = self.animal
        parts = {
            "pet": f"All day long, {self.pet} the {name} {sound} and follows {self.hero} around.",
            "town": f"{self.hero} thought about home in {self.town}.",
            "food": f"For lunch {self.hero} ate {self.food}, the food {self.hero} liked best.",
            "friend": f"{self.friend} the {self.job[0]} came to say hello.",
            "thing": f"{self.hero} held the {self.color} {self.thing} tightly.",
        }
        return f"Chapter {words(index + 2)}. " + " ".join(parts[key] for key in keys)

    def closing(self):
        name, _, sound, *_ = self.animal
        return (
            f"At the end of the day, {self.hero} came back home to {self.town}. {self.pet} the {name} was waiting at "
            f"the door. Every evening, {self.pet} {sound} when {self.hero} comes home. {self.friend} the {self.job[0]} came for dinner, and they ate "
            f"{self.food}. Before bed, {self.hero} put the {self.color} {self.thing} on the shelf. The end."
        )


class Secret(Kind):
    def __init__(self, rng):
        super().__init__(rng)
        self.number = rng.randint(10, 99)
        self.word = rng.choice(C.OBJECTS)
        self.color = rng.choice(C.COLORS)
        self.name = rng.choice(C.NAMES)
        self.keys = ["number", "word", "color", "name"]

    def title(self):
        return "A memory game"

    def opening(self):
        return [
            (
                f"Let's play a memory game. The secret number of the day is {self.number}. The secret word is "
                f"{self.word}. The secret color is {self.color}, and the helper of the day is {self.name}."
            ),
            "Keep them in mind while you read, because we will ask about them later.",
        ]

    def mention(self, keys, index):
        parts = {
            "number": f"the secret number is {self.number}",
            "word": f"the secret word is {self.word}",
            "color": f"the secret color is {self.color}",
            "name": f"the helper of the day is {self.name}",
        }
        return f"Quick check: {join_and([parts[key] for key in keys])}."

    def closing(self):
        return (
            f"As we said at the start, the secret number is {self.number}, the secret word is {self.word}, the "
            f"secret color is {self.color} and the helper of the day is {self.name}. Well done if you remembered!"
        )


class WordList(Kind):
    def __init__(self, rng):
        super().__init__(rng)
        pool = C.OBJECTS + C.FOODS + C.COLORS + [a[0] for a in C.ANIMALS]
        self.things = [
            w if rng.random() < 0.8 else str(rng.randint(10, 99)) for w in rng.sample(pool, rng.randint(6, 10))
        ]
        self.keys = [str(i) for i in range(len(self.things))]

    def title(self):
        return "A list to remember"

    def opening(self):
        return [
            f"Here is a list of {words(len(self.things))} things to remember, in order: {', '.join(self.things)}.",
            "Read it twice. Later we will say it again.",
        ]

    def mention(self, keys, index):
        if len(keys) > len(self.keys) // 2:
            return f"Let's say the list once more, in order: {', '.join(self.things)}."
        return " ".join(f"The {ORDINALS[int(k)]} thing on the list was {self.things[int(k)]}." for k in keys)

    def closing(self):
        return f"Now say the whole list again, in the same order: {', '.join(self.things)}. That is the list."


class Week(Kind):
    def __init__(self, rng):
        super().__init__(rng)
        self.name = rng.choice(C.NAMES)
        activities = rng.sample(C.ACTIVITIES, 7)
        self.plan = {day: (activity, rng.randint(7, 11)) for day, activity in zip(C.DAYS, activities, strict=True)}
        self.keys = list(C.DAYS)

    def title(self):
        return f"{self.name}'s week"

    def line(self, day):
        activity, hour = self.plan[day]
        return f"On {day}, {self.name} {activity} at {words(hour)} o'clock."

    def opening(self):
        return [f"This is {self.name}'s plan for the week.", " ".join(self.line(day) for day in C.DAYS)]

    def mention(self, keys, index):
        return " ".join(f"Question: What does {self.name} do on {day}? Answer: {self.line(day)}" for day in keys)

    def closing(self):
        return f"Here is {self.name}'s plan for the week again. " + " ".join(self.line(day) for day in C.DAYS)


class Farm(Kind):
    def __init__(self, rng):
        super().__init__(rng)
        self.name = rng.choice(C.NAMES)
        self.town = rng.choice(TOWNS)
        animals = rng.sample([a for a in C.ANIMALS if a[0] not in ("whale", "lion", "penguin", "spider")], 5)
        self.counts = {a[0]: (a, rng.randint(2, 12)) for a in animals}
        self.keys = list(self.counts)

    def title(self):
        return f"{self.name}'s farm"

    @staticmethod
    def many(animal, n):
        return f"{words(n)} {animal[0] if n == 1 else animal[1]}"

    def opening(self):
        listing = join_and([self.many(a, n) for a, n in self.counts.values()])
        return [
            f"{self.name} has a farm near {self.town}. On the farm there are {listing}.",
            f"Every day {self.name} feeds the animals and counts them to make sure nobody is lost.",
        ]

    def mention(self, keys, index):
        parts = []
        for key in keys:
            animal, n = self.counts[key]
            parts.append(
                f"{self.name} went to feed the {animal[1]}. There were {words(n)} of them, and they ate {animal[3]}."
            )
        return " ".join(parts)

    def closing(self):
        listing = join_and([self.many(a, n) for a, n in self.counts.values()])
        total = sum(n for _, n in self.counts.values())
        return (
            f"In the evening {self.name} counted the animals again: {listing}. "
            f"That makes {total} animals in all, the same as in the morning."
        )


class Club(Kind):
    def __init__(self, rng):
        super().__init__(rng)
        self.club = rng.choice(CLUBS)
        self.town = rng.choice(TOWNS)
        members = rng.sample(C.NAMES, rng.randint(4, 6))
        jobs = rng.sample(C.JOBS, len(members))
        foods = rng.sample(C.FOODS, len(members))
        self.members = {m: (job[0], food) for m, job, food in zip(members, jobs, foods, strict=True)}
        self.keys = members

    def title(self):
        return f"The {self.club} of {self.town}"

    def opening(self):
        intro = [f"The {self.club} of {self.town} has {words(len(self.members))} members."]
        for member, (job, food) in self.members.items():
            intro.append(f"{member} is {with_article(job)} and always brings {food} to the meetings.")
        return [" ".join(intro)]

    def mention(self, keys, index):
        parts = []
        for member in keys:
            job, food = self.members[member]
            if self.rng.random() < 0.5:
                parts.append(f"Who is the {job} in the club? It is {member}, who brings {food}.")
            else:
                parts.append(f"{member} the {job} arrived with some {food}.")
        return " ".join(parts)

    def closing(self):
        listing = " ".join(f"{m} the {job} brought {food}." for m, (job, food) in self.members.items())
        return f"At the last meeting of the year, every member of the {self.club} came. {listing} It was a good year."


KINDS = [Shopping, Story, Secret, WordList, Week, Farm, Club]


def target_length(rng: random.Random) -> int:
    """Mostly 3,200 to 3,900 characters, some up to 7,500 (keeps the files small)."""
    r = rng.random()
    if r < 0.65:
        return rng.randint(3200, 3900)
    if r < 0.92:
        return rng.randint(3900, 5200)
    return rng.randint(5200, 7500)


def document(rng: random.Random) -> tuple[str, list[tuple[str, int]]]:
    """One document and the (fact, character offset) of each statement or reference of its facts."""
    kind = rng.choice(KINDS)(rng)
    paragraphs = [kind.title() + "."] + kind.opening()

    def size() -> int:
        return sum(len(p) + 1 for p in paragraphs)

    refs = [(key, len(paragraphs[0]) + 1) for key in kind.keys]
    last = {key: 0 for key in kind.keys}
    length = target_length(rng)
    closing_size = len(kind.closing())
    # plan the filler gaps first, so that each mention knows how far away the next one is
    gaps, budget = [], length - size() - closing_size
    while budget > MAX_FILLER_GAP:
        gap = rng.randint(MIN_GAP, min(MAX_FILLER_GAP, budget - MIN_GAP))
        gaps.append(gap)
        budget -= gap + MENTION + OVERSHOOT // 2
    gaps.append(max(budget - OVERSHOOT // 2, MIN_GAP))
    for index, gap in enumerate(gaps):
        paragraphs += filler(rng, gap)
        at = size()
        if index == len(gaps) - 1:
            paragraphs.append(kind.closing())
            refs += [(key, at) for key in kind.keys]
            break
        horizon = at + MENTION + gaps[index + 1] + OVERSHOOT  # where the next mention will be, at the latest
        due = [key for key in kind.keys if horizon - last[key] > MAX_GAP]
        others = [key for key in kind.keys if key not in due]
        extra = rng.sample(others, rng.randint(0 if due else 1, min(2, len(others))))
        keys = [key for key in kind.keys if key in due or key in extra]  # in the order of the opening
        paragraphs.append(kind.mention(keys, index))
        for key in keys:
            last[key] = at
            refs.append((key, at))
    return "\n".join(paragraphs), refs


# file -> (seed, number of documents)
FILES = {"train.jsonl": (21, 300), "heldout.jsonl": (22, 40)}


def longest_gap(refs: list[tuple[str, int]]) -> int:
    """The most characters between two consecutive statements of the same fact."""
    last: dict[str, int] = {}
    longest = 0
    for key, at in refs:
        if key in last:
            longest = max(longest, at - last[key])
        last[key] = at
    return longest


def build(seed: int, n_docs: int) -> list[tuple[str, list[tuple[str, int]]]]:
    """`n_docs` distinct documents within the length limits whose facts are never more than MAX_REF_GAP back."""
    rng = random.Random(seed)
    docs: dict[str, list] = {}
    while len(docs) < n_docs:
        text, refs = document(rng)
        if MIN_CHARS <= len(text) <= MAX_CHARS and longest_gap(refs) <= MAX_REF_GAP:
            docs.setdefault(text, refs)
    return list(docs.items())


def main(out_dir: str = HERE) -> None:
    """Write `train.jsonl` and `heldout.jsonl` into `out_dir` (this folder by default)."""
    written: set[str] = set()
    for file_name, (seed, n_docs) in FILES.items():
        docs = build(seed, n_docs)
        texts = [text for text, _ in docs]
        assert not written & set(texts), "a held-out document is also in train"
        written |= set(texts)
        with open(os.path.join(out_dir, file_name), "w", encoding="utf-8", newline="\n") as handle:
            handle.writelines(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts)


if __name__ == "__main__":
    main()
