"""The demo task: free-text customer messages -> one JSON object with fixed fields.

Deterministic and written by the project (no data copied from anywhere): intents, products,
quantities and urgency are drawn with a seeded RNG and phrased through many templates, so an
instruct model that has never seen the schema does poorly and a LoRA adapter learns it quickly.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM_PROMPT = (
    "You turn customer messages into JSON. Answer with one JSON object and nothing else, with the keys "
    '"intent" (one of: order, cancel, return, track, question), "product" (the product named), '
    '"quantity" (an integer, 1 when not stated) and "urgency" (one of: low, normal, high).'
)
FIELDS = ("intent", "product", "quantity", "urgency")

PRODUCTS = [
    "wireless mouse", "mechanical keyboard", "USB-C cable", "laptop stand", "noise-cancelling headphones",
    "webcam", "desk lamp", "office chair", "standing desk", "monitor arm", "external SSD", "phone charger",
    "coffee grinder", "water bottle", "yoga mat", "running shoes", "backpack", "travel mug", "bluetooth speaker",
    "smart watch", "paper shredder", "ink cartridge", "HDMI adapter", "power bank", "ergonomic footrest",
]
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                9: "nine", 10: "ten", 12: "twelve", 20: "twenty"}
GREETINGS = ["", "Hi, ", "Hello, ", "Hey there, ", "Good morning, ", "Hi team, ", "Dear support, ", "Hello again, "]
SIGN_OFFS = ["", " Thanks!", " Thank you.", " Cheers.", " Best regards, Sam.", " Thanks in advance.", " - Priya"]
URGENCY_CUES = {
    "high": ["I need it urgently.", "This is urgent!", "ASAP please.", "It has to arrive by tomorrow.",
             "Please hurry, it's for an event tonight.", "Time-critical, please prioritise."],
    "normal": ["", "", "When you get a chance.", "Let me know the next steps."],
    "low": ["No rush at all.", "Whenever is convenient.", "It's not urgent.", "Take your time."],
}
TEMPLATES = {
    "order": [
        "I'd like to order {qty} {product}.", "Can I buy {qty} {product}?", "Please send me {qty} {product}.",
        "We want to purchase {qty} {product} for the office.", "Add {qty} {product} to my order, please.",
        "I want {qty} {product}.", "Could you ship {qty} {product} to my address?",
    ],
    "cancel": [
        "Please cancel my order of {qty} {product}.", "I need to cancel the {qty} {product} I ordered.",
        "Cancel the order for {qty} {product}, I changed my mind.", "Stop my order of {qty} {product}.",
    ],
    "return": [
        "I want to return {qty} {product}; they arrived damaged.", "How do I send back {qty} {product}?",
        "The {item} doesn't work, I'd like to return {qty} of them.", "Return request: {qty} {product}.",
    ],
    "track": [
        "Where is my {product}?", "Can you track my order of {qty} {product}?",
        "My {product} hasn't arrived yet.", "What's the status of the {qty} {product} I bought?",
    ],
    "question": [
        "Is the {product} compatible with a Mac?", "Does the {product} come with a warranty?",
        "What colours does the {product} come in?", "How long does the {product} battery last?",
    ],
}


def _quantity_text(rng: random.Random, qty: int, product: str) -> str:
    if qty == 1:
        article = "an" if product[0] in "aeiouAEIOU" else "a"
        return rng.choice([article, "one", "1"])
    if qty in NUMBER_WORDS and rng.random() < 0.4:
        return NUMBER_WORDS[qty]
    return str(qty)


def _plural(product: str, qty: int) -> str:
    if qty == 1 or product.endswith("s"):
        return product
    return product[: -len("mouse")] + "mice" if product.endswith("mouse") else product + "s"


def make_example(rng: random.Random) -> dict:
    """One (prompt, completion) pair; the completion is the target JSON."""
    intent = rng.choice(list(TEMPLATES))
    product = rng.choice(PRODUCTS)
    template = rng.choice(TEMPLATES[intent])
    qty = rng.choice([1, 1, 2, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20]) if "{qty}" in template else 1
    urgency = rng.choices(["low", "normal", "high"], weights=[1, 2, 1])[0]
    shown = _plural(product, qty) if "{qty}" in template else product
    body = template.format(qty=_quantity_text(rng, qty, product), product=shown, item=product)
    greeting = rng.choice(GREETINGS)
    if greeting and not body.startswith(("I ", "I'")):
        body = body[0].lower() + body[1:]
    cue = rng.choice(URGENCY_CUES[urgency])
    message = greeting + body + (" " + cue if cue else "") + rng.choice(SIGN_OFFS)
    target = {"intent": intent, "product": product, "quantity": qty, "urgency": urgency}
    return {"prompt": message, "completion": json.dumps(target)}


def generate_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` distinct examples; the same seed always gives the same rows."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        row = make_example(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows


def write_demo_data(folder: str | Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """Write train.jsonl and eval.jsonl (disjoint prompts) to `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = generate_rows(n_train + n_eval, seed)
    paths = folder / "train.jsonl", folder / "eval.jsonl"
    for path, part in zip(paths, (rows[:n_train], rows[n_train:])):
        path.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return paths
