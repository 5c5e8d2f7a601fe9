"""Build data/stdlib-prefs/ (preference pairs) from data/stdlib-chat/: deterministic, no download.

Each conversation's history up to its final assistant turn is the prompt; the chosen reply is that turn (the
answer the history supports); the rejected reply is the final answer of another conversation that ends on the
same follow-up question — the same form (a module or a bare name), fluent, and wrong for this conversation.
Pairs whose two replies happen to be equal are left out.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE, TARGET = REPO / "data" / "stdlib-chat", REPO / "data" / "stdlib-prefs"


def pairs(rows: list[dict], seed: int) -> list[dict]:
    """One pair per conversation: (history, its true final reply, another conversation's reply to that question)."""
    rng = random.Random(seed)
    by_question: dict[str, list[str]] = {}
    for row in rows:
        by_question.setdefault(row["messages"][-2]["content"], []).append(row["messages"][-1]["content"])
    out = []
    for row in rows:
        *history, final = row["messages"]
        answers = [a for a in by_question[history[-1]["content"]] if a != final["content"]]
        if not answers:
            continue
        out.append(
            {
                "prompt": history,
                "chosen": [{"role": "assistant", "content": final["content"]}],
                "rejected": [{"role": "assistant", "content": rng.choice(answers)}],
            }
        )
    return out


def main() -> None:
    TARGET.mkdir(parents=True, exist_ok=True)
    for split, seed in (("train", 0), ("test", 1)):
        rows = [json.loads(line) for line in (SOURCE / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        made = pairs(rows, seed)
        with open(TARGET / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in made)
        print(f"{split}: {len(made)} pairs")


if __name__ == "__main__":
    main()
