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
"""Regenerate the bundled toy chat SFT set: short questions and one-sentence answers on facts the bundled pretraining
corpus states, plus a few copying skills (see DATA_CARD.md).

    python modeling_mobilemoe/resources/sft/generate_sft.py

writes `train.jsonl` (`{"messages": [...]}` a line) and `heldout.jsonl` (`{"messages": [user], "answer": ...,
"category": ...}` a line) next to this file, byte for byte the same on every run (fixed seeds, standard library only).
The facts come from the tables of `../corpus/generate_corpus.py`, imported rather than copied. Every held-out item is a
fact (or a pair of numbers, or a word) that `train.jsonl` never asks about, and every held-out fact is checked to be
stated in the shipped corpus files (`../corpus/*.txt`), so a model can only answer it by recalling pretraining.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import sys
from dataclasses import dataclass


HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS_DIR = os.path.join(os.path.dirname(HERE), "corpus")


sys.dont_write_bytecode = True  # importing the corpus generator must not leave __pycache__ in the shipped resources
sys.path.insert(0, CORPUS_DIR)
import generate_corpus as C  # noqa: E402  (its word lists, fact tables and templates)


words, cap, with_article = C.words, C.cap, C.with_article

N_TRAIN = 3000
SYSTEM_SHARE = 0.04  # share of single-turn examples that get a system message
TWO_TURN_SHARE = 0.04  # two-turn conversations, as a share of N_TRAIN
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer in one short sentence.",
    "You are MobileMoE, a small and friendly assistant.",
    "Answer briefly and clearly.",
    "You are a patient teacher for young children. Keep your answers short.",
]
SYLLABLES = "ba be bo bu da di do ka ki ko lu la li ma mi mo na ni nu pa po ri ro sa so ta ti tu va vo za zu".split()
SYLLABLES += "bel dor fin gan kel lom mar nor pel ran sel tor vin wel zan".split()


@dataclass(frozen=True)
class Item:
    """One question a user may ask: `category` and `key` name the fact (two items with the same key are the same
    fact), `prompts` its phrasings and `replies` their one-sentence answers, `answer` the short string a correct reply
    must contain, and `evidence` a regular expression that the corpus must match for a held-out fact (None: a skill)."""

    category: str
    key: tuple
    prompts: tuple[str, ...]
    replies: tuple[str, ...]
    answer: str
    evidence: str | None = None
    copy_skill: bool = False  # the answer is copied from the prompt (allowed to appear in it)


def item(category, key, prompts_and_replies, answer, evidence=None, copy_skill=False) -> Item:
    prompts, replies = zip(*prompts_and_replies, strict=True)
    return Item(category, key, tuple(prompts), tuple(replies), answer, evidence, copy_skill)


def same(prompts: list[str], reply: str) -> list[tuple[str, str]]:
    return [(prompt, reply) for prompt in prompts]


def strip_article(phrase: str) -> str:
    return re.sub(r"^(a|an|the) ", "", phrase)


# --- facts: every category maps the corpus tables to items -----------------------------------------------------------


def animal_items() -> list[Item]:
    items = []
    for name, plural, sound, food, home, legs, covering, baby in C.ANIMALS:
        a, A = with_article(name), cap(with_article(name))
        legs_text = "no legs" if legs == 0 else f"{words(legs)} legs"
        fact0 = (
            rf"The {name} {sound}\. It eats {food} and lives in {home}\. {A} has {legs_text} and its body is covered"
        )
        items.append(
            item(
                "animal_sound",
                (name,),
                same(
                    [
                        f"What sound does {a} make?",
                        f"What noise does {a} make?",
                        f"Which sound does {a} make?",
                        f"Tell me the sound {a} makes.",
                    ],
                    f"{A} {sound}.",
                ),
                "no sound" if sound == "makes no sound" else sound.split()[0],
                fact0 + "|" + rf"{re.escape(A)} {sound}\.",
            )
        )
        items.append(
            item(
                "animal_food",
                (name,),
                same(
                    [
                        f"What does {a} eat?",
                        f"What food does {a} eat?",
                        f"What does {a} like to eat?",
                        f"What do {plural} eat?",
                    ],
                    f"{A} eats {food}.",
                ),
                re.split(r", | and ", food)[0],
                fact0 + "|" + rf"{re.escape(A)} eats {food}\.",
            )
        )
        items.append(
            item(
                "animal_legs",
                (name,),
                same(
                    [
                        f"How many legs does {a} have?",
                        f"How many legs has {a} got?",
                        f"Count the legs of {a}.",
                        f"How many legs do {plural} have?",
                    ],
                    f"{A} has {legs_text}.",
                ),
                "no legs" if legs == 0 else words(legs),
                rf"{A} has {legs_text}",
            )
        )
        items.append(
            item(
                "animal_home",
                (name,),
                same(
                    [
                        f"Where does {a} live?",
                        f"Where is the home of {a}?",
                        f"Where do {plural} live?",
                        f"Where does {a} make its home?",
                    ],
                    f"{A} lives in {home}.",
                ),
                strip_article(home.split(" or ")[0]),
                rf"It eats {food} and lives in {home}\. {A} has",
            )
        )
        items.append(
            item(
                "animal_baby",
                (name,),
                same(
                    [
                        f"What is a baby {name} called?",
                        f"What do we call a baby {name}?",
                        f"What is the name for a young {name}?",
                        f"A baby {name} has a special name. What is it?",
                    ],
                    f"A baby {name} is called {with_article(baby)}.",
                ),
                baby,
                rf"A baby {name} is called {with_article(baby)}\.",
            )
        )
        items.append(
            item(
                "animal_covering",
                (name,),
                same(
                    [
                        f"What is {a} covered with?",
                        f"What covers the body of {a}?",
                        f"What is on the skin of {a}?",
                        f"What does {a} have on its body?",
                    ],
                    f"{A} is covered with {covering}.",
                ),
                covering,
                rf"{A} has {legs_text} and its body is covered with {covering}\.",
            )
        )
    return items


def color_items() -> list[Item]:
    items = []
    for thing, color in C.COLORED_THINGS:
        items.append(
            item(
                "color_of_thing",
                (thing,),
                same(
                    [
                        f"What color is {thing}?",
                        f"What colour is {thing}?",
                        f"Tell me the color of {thing}.",
                        f"Which color is {thing}?",
                    ],
                    f"{cap(thing)} is {color}.",
                ),
                color,
                rf"{re.escape(cap(thing))} is {color}[,.]",
            )
        )
    for first, second, result in C.MIXES:
        pairs = []
        for x, y in ((first, second), (second, first)):
            reply = f"Mixing {x} and {y} makes {result}."
            pairs += same(
                [
                    f"What color do you get when you mix {x} and {y}?",
                    f"What do {x} and {y} make?",
                    f"Mix {x} paint with {y} paint. What color do you get?",
                ],
                reply,
            )
        items.append(
            item(
                "color_mix",
                (first, second),
                pairs,
                result,
                rf"When you mix {first} paint with {second} paint, you get {result}\.",
            )
        )
    return items


def calendar_items() -> list[Item]:
    items = []
    days, months = C.DAYS, C.MONTHS
    for i in range(7):
        d, n = days[i], days[(i + 1) % 7]
        # a held-out pair of neighbours leaves train in both directions: both items share the key
        evidence = rf"Today is {n}\. Yesterday was {d}|Today is {d}\. Yesterday was \w+ and tomorrow will be {n}"
        evidence += rf"|The day after {d} is {n}"
        items.append(
            item(
                "day_after",
                ("day", d, n),
                same(
                    [
                        f"What day comes after {d}?",
                        f"What is the day after {d}?",
                        f"If today is {d}, what day is tomorrow?",
                        f"Which day follows {d}?",
                    ],
                    f"The day after {d} is {n}.",
                ),
                n,
                evidence,
            )
        )
        items.append(
            item(
                "day_before",
                ("day", d, n),
                same(
                    [
                        f"What day comes before {n}?",
                        f"What is the day before {n}?",
                        f"If today is {n}, what day was yesterday?",
                        f"Which day is just before {n}?",
                    ],
                    f"The day before {n} is {d}.",
                ),
                d,
                evidence,
            )
        )
    for i in range(12):
        m, n = months[i], months[(i + 1) % 12]
        evidence = rf"{n} comes after {m}|{m} comes after \w+ and before {n}"
        items.append(
            item(
                "month_after",
                ("month", m, n),
                same(
                    [f"What month comes after {m}?", f"Which month follows {m}?", f"What is the month after {m}?"],
                    f"The month after {m} is {n}.",
                ),
                n,
                evidence,
            )
        )
        items.append(
            item(
                "month_before",
                ("month", m, n),
                same(
                    [
                        f"What month comes before {n}?",
                        f"Which month is just before {n}?",
                        f"What is the month before {n}?",
                    ],
                    f"The month before {n} is {m}.",
                ),
                m,
                evidence,
            )
        )
        number_prompts = same(
            [f"What number month is {m}?", f"Which month of the year is {m}?"],
            f"{m} is month number {i + 1} of the year.",
        )
        number_prompts += same(
            [f"Which month is month number {i + 1}?", f"What is month number {i + 1} of the year?"],
            f"Month number {i + 1} is {m}.",
        )
        items.append(
            item(
                "month_number",
                (m,),
                number_prompts,
                m,
                rf"{m} usually has \d+ days\. It is month number {i + 1} of the year\.",
            )
        )
        d = C.MONTH_DAYS[i]
        items.append(
            item(
                "month_days",
                (m,),
                same(
                    [f"How many days does {m} have?", f"How many days are there in {m}?", f"How long is {m} in days?"],
                    f"{m} usually has {d} days.",
                ),
                str(d),
                rf"{m} usually has {d} days\.",
            )
        )
    return items


def world_items() -> list[Item]:
    items = []
    for shape, sides in C.SHAPES:
        A = cap(with_article(shape))
        items.append(
            item(
                "shape_sides",
                (shape,),
                same(
                    [
                        f"How many sides does {with_article(shape)} have?",
                        f"How many sides has {with_article(shape)} got?",
                        f"Count the sides of {with_article(shape)}.",
                    ],
                    f"{A} has {words(sides)} sides.",
                ),
                words(sides),
                rf"{A} has {words(sides)} sides\.",
            )
        )
    for vehicle, wheels in C.VEHICLES:
        A = cap(with_article(vehicle))
        items.append(
            item(
                "vehicle_wheels",
                (vehicle,),
                same(
                    [
                        f"How many wheels does {with_article(vehicle)} have?",
                        f"How many wheels has {with_article(vehicle)} got?",
                        f"Count the wheels of {with_article(vehicle)}.",
                    ],
                    f"{A} has {words(wheels)} wheels.",
                ),
                words(wheels),
                rf"{A} has {words(wheels)} wheels\.",
            )
        )
    for job, does, where in C.JOBS:
        A = cap(with_article(job))
        items.append(
            item(
                "job_does",
                (job,),
                same(
                    [
                        f"What does {with_article(job)} do?",
                        f"What is the work of {with_article(job)}?",
                        f"Tell me what {with_article(job)} does.",
                    ],
                    f"{A} {does}.",
                ),
                does.split()[0],
                rf"{with_article(job)}\. {A} {does}\.",
            )
        )
        items.append(
            item(
                "job_where",
                (job,),
                same(
                    [
                        f"Where does {with_article(job)} work?",
                        f"Where does {with_article(job)} usually work?",
                        f"Where can you find {with_article(job)} at work?",
                    ],
                    f"{A} works at {where}.",
                ),
                strip_article(where),
                rf"{with_article(job)}\. {A} {re.escape(does)}\. Most days \S+ works at {re.escape(where)},",
            )
        )
    return items


# --- numbers -------------------------------------------------------------------------------------------------------


def number_items() -> list[Item]:
    items = []
    for a in range(21):
        for b in range(21):
            c = a + b
            items.append(
                item(
                    "addition",
                    tuple(sorted((a, b))),
                    same(
                        [f"What is {a} plus {b}?", f"How much is {a} plus {b}?", f"Add {a} and {b}."],
                        f"{a} plus {b} is {c}.",
                    )
                    + [(f"What is {a} + {b}?", f"{a} + {b} = {c}.")],
                    str(c),
                    rf"\b{a} \+ {b} = {c}\b|\b{b} \+ {a} = {c}\b|\b{a} plus {b} is {c}\b|\b{b} plus {a} is {c}\b",
                )
            )
            if b <= a:
                items.append(
                    item(
                        "subtraction",
                        (a, b),
                        same(
                            [
                                f"What is {a} minus {b}?",
                                f"Subtract {b} from {a}.",
                                f"Take {b} away from {a}. What is left?",
                            ],
                            f"{a} minus {b} is {a - b}.",
                        )
                        + [(f"What is {a} - {b}?", f"{a} - {b} = {a - b}.")],
                        str(a - b),
                        rf"\b{a} - {b} = {a - b}\b",
                    )
                )
    for a in range(1, 13):
        for b in range(1, 13):
            c = a * b
            items.append(
                item(
                    "multiplication",
                    tuple(sorted((a, b))),
                    same(
                        [f"What is {a} times {b}?", f"How much is {a} times {b}?", f"Multiply {a} by {b}."],
                        f"{a} times {b} is {c}.",
                    )
                    + [(f"What is {a} × {b}?", f"{a} × {b} = {c}.")],
                    str(c),
                    rf"\b({a} times {b}|{b} times {a}) is {c}\b|\b({a} groups of {b}|{b} groups of {a}) make {c}\b",
                )
            )
    for n in range(1, 100):
        parity = "even" if n % 2 == 0 else "odd"
        items.append(
            item(
                "parity",
                (n,),
                same(
                    [
                        f"Is {n} odd or even?",
                        f"Is {n} an odd number or an even number?",
                        f"Tell me if {n} is odd or even.",
                    ],
                    f"{n} is {parity}.",
                ),
                f"{n} is {parity}",
                rf"The number {n} is {parity}\.",
            )
        )
    for n in range(100):
        items.append(
            item(
                "next_number",
                (n,),
                same(
                    [
                        f"What number comes after {n}?",
                        f"What is the next number after {n}?",
                        f"Which number follows {n}?",
                    ],
                    f"The number after {n} is {n + 1}.",
                ),
                str(n + 1),
                rf"The number {n} is \w+\. [^.]*\. The number after it is {n + 1},",
            )
        )
    for n in range(200):
        items.append(
            item(
                "number_words",
                (n,),
                same(
                    [f"Write {n} in words.", f"How do you write {n} in words?", f"Spell out the number {n}."],
                    f"{n} in words is {words(n)}.",
                ),
                words(n),
                rf"(?i)\b{words(n)}\b",
            )
        )
    return items


# --- copying skills ------------------------------------------------------------------------------------------------


def vocabulary() -> list[str]:
    """Single, plain-ASCII words of the corpus word lists, sorted."""
    pool = C.COLORS + C.ADJECTIVES + C.OBJECTS + C.FOODS + [a[0] for a in C.ANIMALS] + [i[0] for i in C.ITEMS]
    pool += [j[0] for j in C.JOBS] + [p.removeprefix("the ") for p in C.PLACES]
    return sorted({w for w in pool if w.isalpha() and w.isascii() and w.islower() and 3 <= len(w) <= 9})


def pseudo_words(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))
        if w not in taken and w not in out and len(w) <= 8:
            out.append(w)
    return out


def repeat_item(w: str) -> Item:
    return item(
        "repeat_word",
        (w,),
        same(
            [f"Repeat the word {w}.", f"Say the word {w}.", f"Please repeat after me: {w}", f"Repeat this word: {w}"],
            f"{w}.",
        ),
        w,
        copy_skill=True,
    )


def spell_item(w: str) -> Item:
    spelled = "-".join(w.upper())
    return item(
        "spell_word",
        (w,),
        same([f"Spell the word {w}.", f"How do you spell {w}?", f"Spell {w} letter by letter."], f"{spelled}."),
        spelled.lower(),
    )


def position_item(category: str, phrase: list[str]) -> Item:
    which = "first" if category == "first_word" else "last"
    w = phrase[0] if which == "first" else phrase[-1]
    quoted = '"' + " ".join(phrase) + '"'
    return item(
        category,
        tuple(phrase),
        same(
            [
                f"What is the {which} word of {quoted}?",
                f"Which word comes {which} in {quoted}?",
                f"Tell me the {which} word in {quoted}.",
            ],
            f'The {which} word is "{w}".',
        ),
        w,
        copy_skill=True,
    )


# --- assembling ----------------------------------------------------------------------------------------------------

# category -> held-out items (one prompt each)
HELDOUT_COUNTS = {
    "animal_sound": 5,
    "animal_food": 5,
    "animal_legs": 5,
    "animal_home": 5,
    "animal_baby": 5,
    "animal_covering": 4,
    "color_of_thing": 5,
    "color_mix": 2,
    "day_after": 2,
    "day_before": 2,
    "month_after": 3,
    "month_before": 3,
    "month_number": 3,
    "month_days": 3,
    "shape_sides": 2,
    "vehicle_wheels": 2,
    "job_does": 4,
    "job_where": 4,
    "addition": 16,
    "subtraction": 10,
    "multiplication": 12,
    "parity": 6,
    "next_number": 8,
    "number_words": 8,
    "repeat_word": 8,
    "spell_word": 8,
    "first_word": 6,
    "last_word": 6,
}
# every phrasing of every train fact goes into train.jsonl; these big categories fill the rest, in these proportions
FILL_WEIGHTS = {
    "addition": 20,
    "subtraction": 10,
    "multiplication": 13,
    "parity": 5,
    "next_number": 6,
    "number_words": 8,
    "repeat_word": 11,
    "spell_word": 11,
    "first_word": 7,
    "last_word": 7,
}
# day/month neighbours are held out as pairs: both the "after" and the "before" question of a pair
PAIRED = {"day_after": "day_before", "month_after": "month_before"}


def corpus_text() -> str:
    files = sorted(glob.glob(os.path.join(CORPUS_DIR, "*.txt")))
    if not files:
        raise FileNotFoundError(f"no corpus files in {CORPUS_DIR}")
    parts = []
    for path in files:
        with open(path, encoding="utf-8") as handle:
            parts.append(handle.read())
    return "\n".join(parts)


def candidate(it: Item) -> bool:
    """Items that may be held out at all (before the per-prompt checks of `eligible`)."""
    if it.answer == "May":  # "may" is also a common word of replies
        return False
    if it.category == "number_words":  # two-digit numbers with a hyphen ("forty-seven")
        return 20 < it.key[0] < 100 and it.key[0] % 10 != 0
    return True


def eligible(it: Item, prompt: str, category_answers: set[str], corpus: str) -> bool:
    """Whether `it`, asked as `prompt`, makes a fair held-out question."""
    answer = it.answer.lower()
    if it.copy_skill:
        return True
    if answer in prompt.lower():
        return False
    # a different answer of the same category containing this one ("kit" in "kitten") would count as right
    if any(answer in other.lower() and answer != other.lower() for other in category_answers):
        return False
    # numbers: at least two digits, so that a wrong "18" cannot contain a right "8"
    if answer.isdigit() and len(answer) < 2:
        return False
    return it.evidence is None or re.search(it.evidence, corpus) is not None  # skills need no evidence


def pick_heldout(items: list[Item], rng: random.Random, corpus: str) -> tuple[list[tuple[Item, str]], set]:
    """Held-out (item, prompt) pairs and the held-out (category, key) set."""
    by_category: dict[str, list[Item]] = {}
    for it in items:
        by_category.setdefault(it.category, []).append(it)
    chosen: list[tuple[Item, str]] = []
    held: set = set()
    for category, count in HELDOUT_COUNTS.items():
        if category in PAIRED.values():
            continue
        candidates = [it for it in by_category[category] if candidate(it)]
        answers = {it.answer for it in candidates}
        picks = []
        for it in rng.sample(candidates, len(candidates)):
            prompt = next(
                (p for p in rng.sample(it.prompts, len(it.prompts)) if eligible(it, p, answers, corpus)), None
            )
            if prompt is None:
                continue
            if category in PAIRED:  # the same neighbours asked the other way round must be fair too
                partner = next(x for x in by_category[PAIRED[category]] if x.key == it.key)
                partner_answers = {x.answer for x in by_category[PAIRED[category]]}
                partner_prompt = next(
                    (
                        p
                        for p in rng.sample(partner.prompts, len(partner.prompts))
                        if eligible(partner, p, partner_answers, corpus)
                    ),
                    None,
                )
                if partner_prompt is None or not candidate(partner):
                    continue
                picks.append((partner, partner_prompt))
            picks.append((it, prompt))
            if len([p for p in picks if p[0].category == category]) == count:
                break
        if len([p for p in picks if p[0].category == category]) < count:
            raise ValueError(f"not enough fair held-out items for {category}")
        chosen += picks
        for it, _ in picks:
            held.add((it.category, it.key))
            if it.category in PAIRED:
                held.add((PAIRED[it.category], it.key))
    return chosen, held


def skill_items(rng: random.Random) -> tuple[list[Item], list[Item]]:
    """(train, held-out candidates) items of the copying skills: disjoint words and phrases."""
    vocab = vocabulary()
    rng.shuffle(vocab)
    pseudo = pseudo_words(rng, 200, set(vocab))
    held_vocab, train_vocab = vocab[:16], vocab[16:]
    held_pseudo, train_pseudo = pseudo[:8], pseudo[8:]
    train = [repeat_item(w) for w in train_vocab + train_pseudo] + [spell_item(w) for w in train_vocab]
    held = [repeat_item(w) for w in held_vocab[:4] + held_pseudo[:4]] + [spell_item(w) for w in held_vocab[4:16]]
    seen: set[tuple[str, ...]] = set()
    for category, n_train, n_held in (("first_word", 400, 6), ("last_word", 400, 6)):
        made = []
        while len(made) < n_train + n_held:
            phrase = rng.sample(vocab, rng.randint(3, 6))
            if tuple(phrase) not in seen:
                seen.add(tuple(phrase))
                made.append(position_item(category, phrase))
        train += made[n_held:]
        held += made[:n_held]
    return train, held


def examples_of(it: Item) -> list[list[dict[str, str]]]:
    return [
        [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        for p, r in zip(it.prompts, it.replies, strict=True)
    ]


def build(seed: int = 11) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    corpus = corpus_text()
    facts = animal_items() + color_items() + calendar_items() + world_items() + number_items()
    skill_train, skill_held = skill_items(rng)
    heldout_pairs, held_keys = pick_heldout(facts + skill_held, rng, corpus)
    train_items = [it for it in facts if (it.category, it.key) not in held_keys] + skill_train

    # single-turn examples: every phrasing of every fact, then samples of the big number and skill categories
    by_category: dict[str, list[list[dict]]] = {}
    for it in train_items:
        by_category.setdefault(it.category, []).extend(examples_of(it))
    singles = [m for category in sorted(by_category) if category not in FILL_WEIGHTS for m in by_category[category]]
    n_two_turn = round(TWO_TURN_SHARE * N_TRAIN)
    n_single = N_TRAIN - n_two_turn
    fill = n_single - len(singles)
    counts = {c: fill * w // sum(FILL_WEIGHTS.values()) for c, w in FILL_WEIGHTS.items()}
    counts["addition"] += fill - sum(counts.values())
    for category, count in counts.items():
        singles += rng.sample(by_category[category], count)
    rng.shuffle(singles)
    for messages in rng.sample(singles, round(SYSTEM_SHARE * n_single)):
        messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})

    # two-turn conversations: half follow-ups about the same animal ("And what does it eat?"), half two questions
    animal_facts = {(it.category, it.key[0]): it for it in train_items if it.category.startswith("animal_")}
    follow_ups = {
        "animal_food": "And what does it eat?",
        "animal_legs": "And how many legs does it have?",
        "animal_home": "And where does it live?",
        "animal_covering": "And what is it covered with?",
    }
    conversations: dict[str, None] = {}
    while len(conversations) < n_two_turn:
        if len(conversations) % 2 == 0:
            name = rng.choice(C.ANIMALS)[0]
            first, second = ("animal_sound", name), (rng.choice(list(follow_ups)), name)
            if first not in animal_facts or second not in animal_facts:
                continue
            it1, it2 = animal_facts[first], animal_facts[second]
            k = rng.randrange(len(it1.prompts))
            messages = [
                {"role": "user", "content": it1.prompts[k]},
                {"role": "assistant", "content": it1.replies[k]},
                {"role": "user", "content": follow_ups[second[0]]},
                {"role": "assistant", "content": it2.replies[0]},
            ]
        else:
            one, two = rng.sample(train_items, 2)
            messages = rng.choice(examples_of(one)) + rng.choice(examples_of(two))
        conversations.setdefault(json.dumps({"messages": messages}, ensure_ascii=False))

    lines = list(
        dict.fromkeys([json.dumps({"messages": m}, ensure_ascii=False) for m in singles] + list(conversations))
    )
    if len(lines) != N_TRAIN:
        raise ValueError(f"{N_TRAIN - len(lines)} duplicate train lines")
    rng.shuffle(lines)
    train = [json.loads(line) for line in lines]

    heldout = [
        {"messages": [{"role": "user", "content": prompt}], "answer": it.answer, "category": it.category}
        for it, prompt in heldout_pairs
    ]
    rng.shuffle(heldout)
    check(train, heldout, train_items, held_keys)
    return train, heldout


def check(train: list[dict], heldout: list[dict], train_items: list[Item], held_keys: set) -> None:
    """Self-checks: no held-out prompt (nor held-out fact) in train, answers in the replies they come from."""
    train_prompts = {m["content"] for example in train for m in example["messages"] if m["role"] == "user"}
    for example in heldout:
        prompt = example["messages"][0]["content"]
        assert prompt not in train_prompts, f"held-out prompt in train: {prompt!r}"
    assert not {(it.category, it.key) for it in train_items} & held_keys, "a held-out fact is asked in train"
    assert len({e["messages"][0]["content"] for e in heldout}) == len(heldout), "duplicate held-out prompts"
    for it in train_items:
        for reply in it.replies:
            assert it.answer.lower() in reply.lower(), (it, reply)


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(out_dir: str = HERE) -> None:
    """Write `train.jsonl` and `heldout.jsonl` into `out_dir` (this folder by default)."""
    train, heldout = build()
    write_jsonl(os.path.join(out_dir, "train.jsonl"), train)
    write_jsonl(os.path.join(out_dir, "heldout.jsonl"), heldout)


if __name__ == "__main__":
    main()
