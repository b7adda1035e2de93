"""Generate the quickstart dataset: short questions answered as one JSON object.

The base SmolLM2-135M-Instruct answers in free prose; after fine-tuning, every answer must be exactly
`{"category": "<category>", "answer": "<answer>"}`. That format is easy to check by regex on held-out
prompts, so the effect of fine-tuning is visible in numbers (format compliance) and by eye.

Deterministic (seeded); rerun with `python recipes/data/make_quickstart_data.py` to regenerate.
Held-out questions use numbers, countries and words that never appear in the training file.

quickstart_prefs.jsonl holds preference pairs for the DPO recipe: new questions from the training
distribution; chosen = the correct, terse JSON answer; rejected = the same JSON with a wrong value or a
wordy value ("The answer is 62."). None of its prompts is a held-out prompt.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("Canada", "Ottawa"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
    ("Greece", "Athens"),
    ("Portugal", "Lisbon"),
    ("Ireland", "Dublin"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Russia", "Moscow"),
    ("Mexico", "Mexico City"),
    ("Argentina", "Buenos Aires"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("Turkey", "Ankara"),
    ("Denmark", "Copenhagen"),
    ("Belgium", "Brussels"),
    ("Hungary", "Budapest"),
    ("Cuba", "Havana"),
]
HELDOUT_CAPITALS = [
    ("Australia", "Canberra"),
    ("Brazil", "Brasilia"),
    ("Netherlands", "Amsterdam"),
    ("South Korea", "Seoul"),
    ("Morocco", "Rabat"),
]
OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("up", "down"),
    ("light", "dark"),
    ("early", "late"),
    ("open", "closed"),
    ("full", "empty"),
    ("strong", "weak"),
    ("young", "old"),
    ("rich", "poor"),
    ("wet", "dry"),
    ("loud", "quiet"),
    ("hard", "soft"),
    ("high", "low"),
    ("thick", "thin"),
    ("near", "far"),
    ("clean", "dirty"),
    ("sharp", "dull"),
]
HELDOUT_OPPOSITES = [
    ("long", "short"),
    ("heavy", "light"),
    ("brave", "afraid"),
    ("inside", "outside"),
    ("first", "last"),
]
WORDS = [
    "planet",
    "river",
    "garden",
    "window",
    "rocket",
    "castle",
    "pencil",
    "forest",
    "silver",
    "dragon",
    "bridge",
    "candle",
    "mirror",
    "island",
    "tomato",
    "guitar",
    "marble",
    "ladder",
    "jacket",
    "rabbit",
]
HELDOUT_WORDS = ["volcano", "penguin", "harbor", "blanket", "compass"]

ARITH_Q = ["What is {a} + {b}?", "Compute {a} plus {b}.", "Add {a} and {b}.", "What do you get if you add {a} to {b}?"]
SUB_Q = ["What is {a} - {b}?", "Subtract {b} from {a}.", "What is {a} minus {b}?"]
MUL_Q = ["What is {a} times {b}?", "Multiply {a} by {b}.", "What is {a} * {b}?"]
CAP_Q = ["What is the capital of {c}?", "Name the capital city of {c}.", "Which city is the capital of {c}?"]
OPP_Q = ["What is the opposite of '{w}'?", "Give the antonym of '{w}'.", "What word means the opposite of '{w}'?"]
LEN_Q = ["How many letters are in the word '{w}'?", "Count the letters in '{w}'."]
CONV_Q = [
    ("How many minutes are in {n} hours?", 60),
    ("How many seconds are in {n} minutes?", 60),
    ("How many meters are in {n} kilometers?", 1000),
    ("How many days are in {n} weeks?", 7),
]


def answer(category: str, value) -> str:
    return json.dumps({"category": category, "answer": str(value)})


def make(rng: random.Random, numbers: range, capitals, opposites, words, n: int):
    rows = []
    for _ in range(n):
        kind = rng.choice(["add", "sub", "mul", "capital", "opposite", "length", "convert"])
        if kind == "add":
            a, b = rng.choice(numbers), rng.choice(numbers)
            q, ans, cat = rng.choice(ARITH_Q).format(a=a, b=b), a + b, "math"
        elif kind == "sub":
            a, b = sorted((rng.choice(numbers), rng.choice(numbers)), reverse=True)
            q, ans, cat = rng.choice(SUB_Q).format(a=a, b=b), a - b, "math"
        elif kind == "mul":
            a, b = rng.randint(2, 12), rng.choice(numbers) % 13 + 2
            q, ans, cat = rng.choice(MUL_Q).format(a=a, b=b), a * b, "math"
        elif kind == "capital":
            c, cap = rng.choice(capitals)
            q, ans, cat = rng.choice(CAP_Q).format(c=c), cap, "geography"
        elif kind == "opposite":
            w, o = rng.choice(opposites)
            q, ans, cat = rng.choice(OPP_Q).format(w=w), o, "language"
        elif kind == "length":
            w = rng.choice(words)
            q, ans, cat = rng.choice(LEN_Q).format(w=w), len(w), "language"
        else:
            tmpl, factor = rng.choice(CONV_Q)
            k = rng.randint(2, 9)
            q, ans, cat = tmpl.format(n=k), k * factor, "units"
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer(cat, ans)}]})
    return rows


def unique(rows):
    seen, out = set(), []
    for r in rows:
        key = r["messages"][0]["content"]
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def wrong(rng: random.Random, value: str) -> str:
    """A plausible wrong or wordy answer in the same JSON format."""
    if rng.random() < 0.5:
        return f"The answer is {value}."
    if value.isdigit():
        return str(int(value) + rng.choice([-11, -10, -2, -1, 1, 2, 10, 11]))
    pool = [c for _, c in CAPITALS] + [o for _, o in OPPOSITES]
    return rng.choice([x for x in pool if x != value])


def preferences(rng: random.Random, exclude: set[str], n: int) -> list[dict]:
    rows = []
    for r in unique(make(rng, range(10, 60), CAPITALS, OPPOSITES, WORDS, 4 * n)):
        q, chosen = r["messages"][0]["content"], r["messages"][1]["content"]
        if q in exclude:
            continue
        obj = json.loads(chosen)
        rejected = answer(obj["category"], wrong(rng, obj["answer"]))
        rows.append({"prompt": q, "chosen": chosen, "rejected": rejected})
    return rows[:n]


def main() -> None:
    rng = random.Random(1234)
    train = unique(make(rng, range(10, 60), CAPITALS, OPPOSITES, WORDS, 700))[:400]
    heldout = unique(make(rng, range(61, 99), HELDOUT_CAPITALS, HELDOUT_OPPOSITES, HELDOUT_WORDS, 200))
    train_prompts = {r["messages"][0]["content"] for r in train}
    heldout = [r for r in heldout if r["messages"][0]["content"] not in train_prompts][:24]
    prefs = preferences(random.Random(99), {r["messages"][0]["content"] for r in heldout}, 160)
    for name, rows in (
        ("quickstart.jsonl", train),
        ("quickstart_heldout.jsonl", heldout),
        ("quickstart_prefs.jsonl", prefs),
    ):
        with open(HERE / name, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"wrote {len(rows)} rows to {HERE / name}")


if __name__ == "__main__":
    main()
