"""Write configs/data/tiny_sums.jsonl: a small deterministic prompt/completion task for smoke runs.

Two-digit additions phrased a few ways; written by the project, nothing copied. Rerun to regenerate:
    python scripts/make_tiny_data.py
"""

import json
import random
from pathlib import Path

PHRASES = ["What is {a} plus {b}?", "Add {a} and {b}.", "{a} + {b} =", "Sum of {a} and {b}:"]


def main(n: int = 400, seed: int = 7) -> None:
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < n:
        a, b, phrase = rng.randint(10, 99), rng.randint(10, 99), rng.choice(PHRASES)
        prompt = phrase.format(a=a, b=b) + " Answer:"
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "completion": f" {a + b}"})
    out = Path(__file__).resolve().parents[1] / "configs" / "data" / "tiny_sums.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
