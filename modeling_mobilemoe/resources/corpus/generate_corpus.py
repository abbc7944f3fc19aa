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
"""Regenerate the bundled toy corpus: simple English written from templates by this project (see DATA_CARD.md).

    python modeling_mobilemoe/resources/corpus/generate_corpus.py

writes `arithmetic.txt`, `nature.txt`, `time.txt`, `stories.txt`, `questions.txt` and `everyday.txt` next to this
file: distinct documents, one per line, byte for byte the same on every run (fixed seeds, standard library only).
"""

from __future__ import annotations

import os
import random


HERE = os.path.dirname(os.path.abspath(__file__))

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen".split()
ONES += "seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
NAMES = [
    "Ana",
    "Ben",
    "Chloé",
    "Dev",
    "Ella",
    "Finn",
    "Grace",
    "Hugo",
    "Iris",
    "Jack",
    "Kai",
    "Lena",
    "Mia",
    "Noah",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
    "Umar",
    "Vera",
    "Wes",
    "Xena",
    "Yuki",
    "Zoë",
    "José",
    "Amara",
    "Leo",
    "Nora",
    "Ravi",
    "Sofia",
    "Theo",
    "Lucía",
    "Ming",
    "Aisha",
    "Oskar",
    "Maya",
    "Eli",
    "Hana",
]
ITEMS = [
    ("apple", "apples"),
    ("pencil", "pencils"),
    ("book", "books"),
    ("marble", "marbles"),
    ("cookie", "cookies"),
    ("stamp", "stamps"),
    ("shell", "shells"),
    ("balloon", "balloons"),
    ("sticker", "stickers"),
    ("card", "cards"),
    ("egg", "eggs"),
    ("flower", "flowers"),
    ("coin", "coins"),
    ("button", "buttons"),
    ("kite", "kites"),
    ("orange", "oranges"),
    ("cup", "cups"),
    ("ribbon", "ribbons"),
    ("toy car", "toy cars"),
    ("leaf", "leaves"),
]
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "gold"]
COLORED_THINGS = [
    ("grass", "green"),
    ("the sky on a clear day", "blue"),
    ("a ripe banana", "yellow"),
    ("snow", "white"),
    ("coal", "black"),
    ("a ripe tomato", "red"),
    ("a carrot", "orange"),
    ("chocolate", "brown"),
    ("a lime", "green"),
    ("a fire truck", "red"),
    ("a lemon", "yellow"),
    ("a storm cloud", "gray"),
    ("a plum", "purple"),
    ("milk", "white"),
    ("a pumpkin", "orange"),
    ("the sea", "blue"),
    ("a flamingo", "pink"),
    ("an elephant", "gray"),
]
MIXES = [
    ("red", "yellow", "orange"),
    ("blue", "yellow", "green"),
    ("red", "blue", "purple"),
    ("red", "white", "pink"),
    ("black", "white", "gray"),
]
# name, plural, sound verb, food, home, legs, covering, baby
ANIMALS = [
    ("dog", "dogs", "barks", "meat and biscuits", "a kennel or a house", 4, "fur", "puppy"),
    ("cat", "cats", "meows", "fish and meat", "a house", 4, "fur", "kitten"),
    ("cow", "cows", "moos", "grass and hay", "a barn", 4, "hair", "calf"),
    ("horse", "horses", "neighs", "hay and oats", "a stable", 4, "hair", "foal"),
    ("sheep", "sheep", "bleats", "grass", "a field", 4, "wool", "lamb"),
    ("duck", "ducks", "quacks", "seeds and small bugs", "a pond", 2, "feathers", "duckling"),
    ("owl", "owls", "hoots", "mice and insects", "a hollow tree", 2, "feathers", "owlet"),
    ("frog", "frogs", "croaks", "flies and worms", "a pond", 4, "smooth skin", "tadpole"),
    ("lion", "lions", "roars", "meat", "the grassland", 4, "fur", "cub"),
    ("bee", "bees", "buzzes", "nectar and pollen", "a hive", 6, "tiny hairs", "larva"),
    ("snake", "snakes", "hisses", "mice and eggs", "a burrow", 0, "scales", "snakelet"),
    ("pig", "pigs", "oinks", "vegetables and grain", "a pen", 4, "bristly hair", "piglet"),
    ("goat", "goats", "bleats", "leaves and grass", "a hillside", 4, "hair", "kid"),
    ("hen", "hens", "clucks", "grain and seeds", "a coop", 2, "feathers", "chick"),
    ("spider", "spiders", "makes no sound", "insects", "a web", 8, "tiny hairs", "spiderling"),
    ("whale", "whales", "sings", "krill and fish", "the ocean", 0, "smooth skin", "calf"),
    ("rabbit", "rabbits", "thumps its feet", "carrots and clover", "a burrow", 4, "fur", "kit"),
    ("bear", "bears", "growls", "berries, fish and honey", "a den", 4, "fur", "cub"),
    ("penguin", "penguins", "squawks", "fish", "the icy south", 2, "feathers", "chick"),
    ("mouse", "mice", "squeaks", "seeds and cheese", "a small hole", 4, "fur", "pup"),
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
MONTH_DAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
SEASONS = {
    "winter": ["December", "January", "February"],
    "spring": ["March", "April", "May"],
    "summer": ["June", "July", "August"],
    "autumn": ["September", "October", "November"],
}
ACTIVITIES = [
    "goes to school",
    "plays football",
    "visits the library",
    "helps at the bakery",
    "swims at the pool",
    "practices the piano",
    "walks the dog",
    "cleans the kitchen",
    "paints in the garden",
    "reads a long book",
    "bakes bread",
    "rides a bike to the park",
    "calls grandma",
    "writes in a diary",
    "waters the plants",
]
WEATHER = ["sunny", "rainy", "windy", "cloudy", "snowy", "foggy", "warm", "cold", "stormy", "bright"]
PLACES = [
    "the park",
    "the beach",
    "the market",
    "the forest",
    "the museum",
    "the farm",
    "the lake",
    "the hills",
    "the zoo",
    "the harbor",
    "the garden",
    "the village square",
    "the train station",
    "the old bridge",
]
SHAPES = [("triangle", 3), ("square", 4), ("pentagon", 5), ("hexagon", 6), ("octagon", 8), ("rectangle", 4)]
# job, what the person does, where
JOBS = [
    ("baker", "bakes bread and cakes", "a bakery"),
    ("doctor", "helps sick people feel better", "a hospital"),
    ("teacher", "teaches children to read and write", "a school"),
    ("farmer", "grows wheat and vegetables", "a farm"),
    ("pilot", "flies airplanes", "an airport"),
    ("nurse", "cares for patients", "a clinic"),
    ("carpenter", "builds tables and chairs from wood", "a workshop"),
    ("chef", "cooks meals", "a restaurant"),
    ("librarian", "helps people find books", "a library"),
    ("firefighter", "puts out fires", "a fire station"),
    ("gardener", "plants flowers and trims hedges", "a garden"),
    ("mechanic", "repairs cars and bicycles", "a garage"),
    ("painter", "paints pictures and walls", "a studio"),
    ("fisher", "catches fish", "a boat"),
    ("dentist", "looks after teeth", "a dental office"),
    ("tailor", "sews clothes", "a tailor's shop"),
    ("musician", "plays songs for an audience", "a concert hall"),
    ("scientist", "runs careful experiments", "a lab"),
    ("vet", "treats sick animals", "an animal clinic"),
    ("mail carrier", "delivers letters and parcels", "the post office"),
    ("builder", "builds houses with bricks", "a building site"),
    ("astronaut", "travels into space", "a space station"),
    ("cashier", "takes payments", "a supermarket"),
    ("driver", "drives a bus around the city", "a bus depot"),
]
FOODS = [
    "bread",
    "rice",
    "soup",
    "cheese",
    "honey",
    "yogurt",
    "pasta",
    "salad",
    "beans",
    "porridge",
    "noodles",
    "pancakes",
    "potatoes",
    "corn",
    "peas",
    "mushrooms",
    "spinach",
    "cucumbers",
    "grapes",
    "cherries",
    "strawberries",
    "peaches",
    "pears",
    "walnuts",
    "almonds",
    "butter",
    "jam",
    "tea",
    "juice",
    "lemonade",
    "dumplings",
    "tortillas",
    "olives",
    "lentils",
    "pumpkin pie",
    "muffins",
    "waffles",
    "oatmeal",
    "melon",
    "figs",
]
ADJECTIVES = [
    "tall",
    "short",
    "quiet",
    "loud",
    "bright",
    "dark",
    "heavy",
    "light",
    "soft",
    "hard",
    "warm",
    "cool",
    "old",
    "new",
    "tiny",
    "huge",
    "shiny",
    "dusty",
    "clean",
    "muddy",
    "round",
    "flat",
    "smooth",
    "rough",
    "sweet",
    "sour",
    "fresh",
    "sleepy",
    "busy",
    "gentle",
    "brave",
    "clever",
    "curious",
    "patient",
    "cheerful",
    "careful",
    "friendly",
    "narrow",
    "wide",
    "wooden",
]
OBJECTS = [
    "basket",
    "lamp",
    "blanket",
    "bucket",
    "ladder",
    "umbrella",
    "backpack",
    "wagon",
    "drum",
    "violin",
    "guitar",
    "telescope",
    "compass",
    "map",
    "lantern",
    "kettle",
    "teapot",
    "hammer",
    "broom",
    "shovel",
    "clock",
    "mirror",
    "window",
    "door",
    "chair",
    "table",
    "bench",
    "bottle",
    "jar",
    "box",
    "rope",
    "bridge",
    "candle",
    "notebook",
    "envelope",
    "helmet",
    "scarf",
    "glove",
    "boot",
    "sweater",
]
VEHICLES = [
    ("bicycle", 2),
    ("car", 4),
    ("bus", 6),
    ("truck", 6),
    ("tricycle", 3),
    ("scooter", 2),
    ("wagon", 4),
    ("motorcycle", 2),
    ("tractor", 4),
    ("minibus", 4),
]
FEELINGS = ["happy", "sad", "excited", "nervous", "proud", "tired", "surprised", "calm", "worried", "grateful"]
GOOD_FEELINGS = ["happy", "excited", "proud", "calm", "grateful"]
VERBS_PAST = [
    "carried",
    "painted",
    "fixed",
    "cleaned",
    "found",
    "borrowed",
    "wrapped",
    "polished",
    "lifted",
    "opened",
    "closed",
    "filled",
    "emptied",
    "moved",
    "counted",
    "measured",
    "weighed",
    "drew",
    "built",
]


def words(n: int) -> str:
    """Spell a number below one thousand in English."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + words(rest))


def cap(text: str) -> str:
    return text[0].upper() + text[1:]


def with_article(noun: str) -> str:
    """The noun with its indefinite article ("a cat", "an owl")."""
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def count_of(n: int, item: tuple[str, str]) -> str:
    return f"{words(n)} {item[0] if n == 1 else item[1]}"


def arithmetic_doc(rng: random.Random) -> str:
    kind = rng.randrange(11)
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if kind >= 9:
        a, b = rng.randint(100, 999), rng.randint(10, 999)
        if kind == 9:
            return (
                f"To add {a} and {b}, line up the ones, the tens and the hundreds. "
                f"The sum is {a + b}: {a} + {b} = {a + b}. In words, that is {words(a)} plus {words(b)}."
                if a + b < 1000
                else f"{a} + {b} = {a + b}, which is more than one thousand."
            )
        big, small = max(a, b), min(a, b)
        return (
            f"{big} - {small} = {big - small}. Subtracting {words(small)} from {words(big)} "
            f"leaves {words(big - small)}."
        )
    name, other, item = rng.choice(NAMES), rng.choice(NAMES), rng.choice(ITEMS)
    if kind == 0:
        return (
            f"{cap(words(a))} plus {words(b)} is {words(a + b)}. In digits, {a} + {b} = {a + b}. "
            f"Adding in the other order gives the same answer: {b} + {a} = {a + b}."
        )
    if kind == 1:
        big, small = max(a, b), min(a, b)
        return (
            f"{cap(words(big))} minus {words(small)} is {words(big - small)}, so {big} - {small} = {big - small}. "
            f"We can check it by adding back: {big - small} + {small} = {big}."
        )
    if kind == 2:
        a, b = rng.randint(1, 12), rng.randint(1, 12)
        return (
            f"{cap(words(a))} times {words(b)} is {words(a * b)}. That means {a} groups of {b} make {a * b}, "
            f"and {a * b} divided by {a} is {b}."
        )
    if kind == 3:
        gain = rng.randint(1, 9)
        return (
            f"{name} has {count_of(a, item)}. "
            f"{other} gives {name} {words(gain)} more {item[0] if gain == 1 else item[1]}. "
            f"Now {name} has {count_of(a + gain, item)}, because {a} + {gain} = {a + gain}."
        )
    if kind == 4:
        a = rng.randint(5, 30)
        loss = rng.randint(1, a)
        return (
            f"There were {count_of(a, item)} on the table. {name} took {words(loss)} of them. "
            f"{cap(words(a - loss))} {'was' if a - loss == 1 else 'were'} left, since {a} - {loss} = {a - loss}."
        )
    if kind == 5:
        start, step = rng.randint(0, 10), rng.randint(1, 5)
        seq = [start + step * i for i in range(6)]
        return (
            f"Counting by {words(step)}s from {words(start)}: {', '.join(map(str, seq))}. "
            f"The next number is {seq[-1] + step}, and each number is {words(step)} more than the one before."
        )
    if kind == 6:
        n = rng.randint(1, 99)
        parity = "even" if n % 2 == 0 else "odd"
        return (
            f"The number {n} is {parity}. {cap(words(n))} {'can' if parity == 'even' else 'cannot'} be split into "
            f"two equal whole parts. The number after it is {n + 1}, which is {'odd' if parity == 'even' else 'even'}."
        )
    if kind == 7:
        if a == b:
            b += 1
        bigger, smaller = max(a, b), min(a, b)
        return (
            f"Which is bigger, {a} or {b}? {cap(words(bigger))} is bigger than {words(smaller)}, "
            f"so {bigger} > {smaller}. The difference between them is {bigger - smaller}."
        )
    shape, sides = rng.choice(SHAPES)
    n = rng.randint(2, 6)
    return (
        f"{cap(with_article(shape))} has {words(sides)} sides. {name} draws {words(n)} of them, so there are "
        f"{n} × {sides} = {n * sides} sides in all."
    )


def nature_doc(rng: random.Random) -> str:
    kind = rng.randrange(7)
    animal = rng.choice(ANIMALS)
    name, plural, sound, food, home, legs, covering, baby = animal
    if kind == 0:
        legs_text = "no legs" if legs == 0 else f"{words(legs)} legs"
        return (
            f"The {name} {sound}. It eats {food} and lives in {home}. {cap(with_article(name))} has {legs_text} "
            f"and its body is covered with {covering}."
        )
    if kind == 1:
        return (
            f"A baby {name} is called {with_article(baby)}. Young {plural} stay close to their mothers "
            f"and learn to find {food.split(' and ')[0]} by watching the adults."
        )
    if kind == 2:
        thing, color = rng.choice(COLORED_THINGS)
        wrong = rng.choice([c for c in COLORS if c != color])
        return f"{cap(thing)} is {color}, not {wrong}. If you look closely, you can see many shades of {color}."
    if kind == 3:
        first, second, result = rng.choice(MIXES)
        return (
            f"When you mix {first} paint with {second} paint, you get {result}. "
            f"Artists mix colors like this to make new ones for their pictures."
        )
    if kind == 4:
        other = rng.choice([a for a in ANIMALS if a[0] != name])
        more, fewer = (animal, other) if legs > other[5] else (other, animal)
        if legs == other[5]:
            return (
                f"{cap(with_article(name))} and {with_article(other[0])} both have {words(legs)} legs, "
                f"so together they have {2 * legs} legs."
            )
        return (
            f"{cap(with_article(more[0]))} has {words(more[5])} legs "
            f"and {with_article(fewer[0])} has {words(fewer[5])}. "
            f"The {more[0]} has {more[5] - fewer[5]} more legs than the {fewer[0]}."
        )
    if kind == 5:
        season = rng.choice(list(SEASONS))
        weather = {
            "winter": "cold and snowy",
            "spring": "mild and rainy",
            "summer": "hot and sunny",
            "autumn": "cool and windy",
        }[season]
        return (
            f"In {season} the weather is often {weather}. Many {plural} change what they do in {season}: "
            f"some rest more, and some search harder for {food.split(' and ')[0]}."
        )
    counts = [(rng.randint(1, 9), animal) for animal in rng.sample(ANIMALS, 3)]
    listing = ", ".join(f"{n} {animal[0] if n == 1 else animal[1]}" for n, animal in counts)
    return f"On the farm we counted {listing}. That makes {sum(n for n, _ in counts)} animals altogether."


def time_doc(rng: random.Random) -> str:
    kind = rng.randrange(7)
    name = rng.choice(NAMES)
    if kind == 0:
        i = rng.randrange(7)
        return (
            f"Today is {DAYS[i]}. Yesterday was {DAYS[i - 1]} and tomorrow will be {DAYS[(i + 1) % 7]}. "
            f"There are seven days in a week."
        )
    if kind == 1:
        i = rng.randrange(12)
        return (
            f"{MONTHS[i]} comes after {MONTHS[i - 1]} and before {MONTHS[(i + 1) % 12]}. "
            f"{MONTHS[i]} usually has {MONTH_DAYS[i]} days. It is month number {i + 1} of the year."
        )
    if kind == 2:
        day, activity = rng.choice(DAYS), rng.choice(ACTIVITIES)
        hour = rng.randint(6, 11)
        return (
            f"Every {day}, {name} {activity} at {words(hour)} o'clock in the morning. "
            f"On {day} evenings, {name} rests and gets ready for {DAYS[(DAYS.index(day) + 1) % 7]}."
        )
    if kind == 3:
        hour, minutes = rng.randint(1, 11), rng.choice([0, 15, 30, 45])
        later = rng.randint(1, 5)
        spoken = {
            0: f"{words(hour)} o'clock",
            15: f"quarter past {words(hour)}",
            30: f"half past {words(hour)}",
            45: f"quarter to {words(hour % 12 + 1)}",
        }[minutes]
        return (
            f"The clock shows {hour}:{minutes:02d}, which we say as {spoken}. "
            f"In {words(later)} hours it will be {(hour + later - 1) % 12 + 1}:{minutes:02d}."
        )
    if kind == 4:
        season, months = rng.choice(list(SEASONS.items()))
        return (
            f"In many northern countries, {season} lasts from {months[0]} to {months[2]}. "
            f"The weather in {season} is often {rng.choice(WEATHER)}, and {name} likes to visit {rng.choice(PLACES)}."
        )
    if kind == 5:
        start = rng.randrange(7)
        span = rng.randint(2, 10)
        return (
            f"If today is {DAYS[start]}, then in {words(span)} days it will be {DAYS[(start + span) % 7]}. "
            f"Counting days is like counting on a circle of seven."
        )
    temp = rng.randint(-5, 30)
    return (
        f"On {rng.choice(DAYS)} the weather was {rng.choice(WEATHER)} and the temperature was {temp} °C. "
        f"{name} wore {'a warm coat' if temp < 10 else 'a light shirt'} to {rng.choice(PLACES)}."
    )


def story_doc(rng: random.Random) -> str:
    hero, friend = rng.sample(NAMES, 2)
    animal = rng.choice(ANIMALS)
    place, day, color = rng.choice(PLACES), rng.choice(DAYS), rng.choice(COLORS)
    item = rng.choice(ITEMS)
    n = rng.randint(2, 9)
    openings = [
        f"On a {rng.choice(WEATHER)} {day}, {hero} went to {place} with {friend}.",
        f"One {day} morning, {hero} and {friend} found {with_article(color)} {item[0]} near {place}.",
        f"{hero} and {friend} had a plan for {day}: they would walk to {place} before lunch.",
        f"Long ago, in a small town beside {place}, there lived two friends named {hero} and {friend}.",
    ]
    middles = [
        f"There they saw {with_article(animal[0])} that {animal[2]} and looked hungry. "
        f"{friend} said, \"Let's bring it some "
        f'{animal[3].split(" and ")[0]}."',
        f"They counted {count_of(n, item)} on the path and put them in {with_article(color)} bag.",
        f'{hero} asked, "How many {item[1]} do we need?" {friend} answered, "{cap(words(n))}, one for each friend."',
        "The path was long, so they sang a song about the days of the week, from Monday to Sunday.",
        f"A little {animal[7]} followed them all the way, and {friend} laughed every time it stopped to look around.",
    ]
    endings = [
        "When the sun went down, they walked home tired and happy.",
        f"In the end, {hero} shared everything with {friend}, and both of them smiled.",
        f"That night, {hero} wrote about the day in a diary and drew {with_article(color)} picture.",
        f"They promised to come back to {place} next {rng.choice(DAYS)}.",
    ]
    return " ".join([rng.choice(openings), *rng.sample(middles, 2), rng.choice(endings)])


def everyday_doc(rng: random.Random) -> str:
    kind = rng.randrange(6)
    name, friend = rng.sample(NAMES, 2)
    if kind == 0:
        job, does, where = rng.choice(JOBS)
        return (
            f"{name} is {with_article(job)}. {cap(with_article(job))} {does}. Most days {name} works at {where}, "
            f"and {name} feels {rng.choice(GOOD_FEELINGS)} when the work goes well."
        )
    if kind == 1:
        adjective, thing = rng.choice(ADJECTIVES), rng.choice(OBJECTS)
        verb, place = rng.choice(VERBS_PAST), rng.choice(PLACES)
        return (
            f"{name} {verb} {with_article(adjective)} {thing} near {place}. "
            f"{friend} said it was the most {rng.choice(ADJECTIVES)} {thing} in town."
        )
    if kind == 2:
        picks = rng.sample(FOODS, 3)
        prices = [rng.randint(1, 9) + rng.choice([0, 0.25, 0.5, 0.75]) for _ in picks]
        listing = ", ".join(f"{food} for ${price:.2f}" for food, price in zip(picks, prices, strict=True))
        return (
            f"At the market {name} bought {listing}. Altogether that cost ${sum(prices):.2f}. "
            f"For dinner, {name} and {friend} shared the {picks[0]} and saved the {picks[2]} for later."
        )
    if kind == 3:
        vehicle, wheels = rng.choice(VEHICLES)
        n = rng.randint(2, 5)
        return (
            f"{cap(with_article(vehicle))} has {words(wheels)} wheels. {name} saw {words(n)} of them on the road, "
            f"so there were {n * wheels} wheels in all."
        )
    if kind == 4:
        height, weight = rng.randint(90, 190), rng.randint(15, 90)
        return (
            f"{name} is {height} cm tall and weighs {weight} kg. Last year {name} was "
            f"{height - rng.randint(1, 8)} cm tall, so {name} has grown a little."
        )
    food, feeling = rng.choice(FOODS), rng.choice(FEELINGS)
    return (
        f'"Would you like some {food}?" asked {name}. "Yes, please," said {friend}, who felt {feeling} '
        f"after a long day. They ate by the {rng.choice(['window', 'lamp', 'lantern', 'door', 'bench'])} and talked "
        f"until it was dark."
    )


def question_doc(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        q, ans = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    elif kind == 1:
        animal = rng.choice(ANIMALS)
        q, ans = f"What sound does {with_article(animal[0])} make?", f"{cap(with_article(animal[0]))} {animal[2]}."
    elif kind == 2:
        thing, color = rng.choice(COLORED_THINGS)
        q, ans = f"What color is {thing}?", f"{cap(thing)} is {color}."
    elif kind == 3:
        i = rng.randrange(7)
        q, ans = f"What day comes after {DAYS[i]}?", f"The day after {DAYS[i]} is {DAYS[(i + 1) % 7]}."
    elif kind == 4:
        animal = rng.choice(ANIMALS)
        q, ans = f"What does {with_article(animal[0])} eat?", f"{cap(with_article(animal[0]))} eats {animal[3]}."
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        q, ans = f"How much is {a} times {b}?", f"{a} times {b} is {a * b}."
    return f"Question: {q} Answer: {ans}"


# file -> (document generator, seed, number of distinct documents)
GENERATORS = {
    "arithmetic.txt": (arithmetic_doc, 1, 600),
    "nature.txt": (nature_doc, 2, 500),
    "time.txt": (time_doc, 3, 400),
    "stories.txt": (story_doc, 4, 350),
    "questions.txt": (question_doc, 5, 300),
    "everyday.txt": (everyday_doc, 6, 600),
}


def main(out_dir: str = HERE) -> None:
    """Write the corpus files into `out_dir` (this folder by default)."""
    for file_name, (make_doc, seed, n_docs) in GENERATORS.items():
        rng = random.Random(seed)
        docs: dict[str, None] = {}  # insertion-ordered set
        for _ in range(100 * n_docs):
            docs.setdefault(make_doc(rng))
            if len(docs) == n_docs:
                break
        with open(os.path.join(out_dir, file_name), "w", encoding="utf-8", newline="\n") as handle:
            handle.writelines(doc + "\n" for doc in docs)


if __name__ == "__main__":
    main()
