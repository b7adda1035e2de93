"""Generate the continued-pretraining sample: plain-text paragraphs from a fictional product manual.

Continued pretraining adapts a model to a domain's text (manuals, tickets, internal docs) with loss on every
token. This sample describes the invented "Aurora" ventilation units: models, error codes and maintenance
intervals. The held-out chat file asks about facts stated in the text, so the recipe's eval and serve stages
have prompts. Deterministic; rerun with `python recipes/data/make_cpt_data.py`.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
MODELS = {"AV-100": (120, 6), "AV-200": (250, 6), "AV-300": (400, 12), "AV-500": (650, 12), "AV-900": (1100, 24)}
CODES = {
    "E02": "the intake filter is clogged",
    "E07": "the fan motor draws too much current",
    "E11": "the humidity sensor is disconnected",
    "E14": "the heat exchanger is frozen",
    "E19": "the condensate pump has failed",
    "E23": "the controller lost its network link",
}
OPENERS = [
    "In the field, technicians report that",
    "According to the service manual,",
    "As a rule,",
    "Installers should remember that",
    "The maintenance guide states that",
]


def paragraph(rng: random.Random) -> str:
    model, (airflow, months) = rng.choice(list(MODELS.items()))
    code, meaning = rng.choice(list(CODES.items()))
    parts = [
        f"{rng.choice(OPENERS)} the Aurora {model} moves up to {airflow} cubic meters of air per hour.",
        f"The {model}'s filters must be replaced every {months} months.",
        f"When the display shows {code}, {meaning}.",
        f"Error {code} on an Aurora unit means that {meaning}; clear the cause before restarting the {model}.",
        f"The {model} is rated for {airflow} m3/h and needs a filter change every {months} months.",
    ]
    rng.shuffle(parts)
    return " ".join(parts[: rng.randint(2, 4)])


def main() -> None:
    rng = random.Random(7)
    rows = sorted({paragraph(rng) for _ in range(400)})[:240]
    rng.shuffle(rows)
    with open(HERE / "cpt_sample.jsonl", "w") as f:
        for t in rows:
            f.write(json.dumps({"text": t}) + "\n")
    questions = [(f"What does error {c} mean on an Aurora unit?", m) for c, m in CODES.items()]
    questions += [
        (f"How often must the filters of the Aurora {m} be replaced?", f"every {v[1]} months")
        for m, v in MODELS.items()
    ]
    with open(HERE / "cpt_heldout.jsonl", "w") as f:
        for q, a in questions:
            f.write(
                json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            )
    print(f"wrote {len(rows)} paragraphs and {len(questions)} held-out questions to {HERE}")


if __name__ == "__main__":
    main()
