"""Build data/stdlib-chat: multi-turn conversations about CPython's standard library (PSF License).

Each conversation asks what a public function or class does (answer: the first sentence of its real
docstring), then asks follow-ups whose answers are only in the history — the module that defines it, or its
bare name — so the final reply cannot be produced without reading the earlier turns. A third of them open
with a system prompt. Deterministic for a given CPython version; run on 3.11.7.
"""

from __future__ import annotations

import inspect
import json
import random
import sys
from pathlib import Path

from make_stdlib_topics import AREAS, first_sentence
from make_tiny_gpt_data import EXTRA_MODULES, public_objects

SYSTEM = "You answer questions about the Python standard library in a few words."
ASK = ("What does `{q}` do?", "Explain `{q}` in one sentence.", "Tell me what {q} is for.")
MODULE = ("Which module is that in?", "What module defines it?", "And which module?")
NAME = ("What is it called, without the module?", "And its bare name?")


def conversation(qualified: str, sentence: str, rng: random.Random) -> dict:
    module, name = qualified.rsplit(".", 1)
    while "." in module and module not in sys.modules:  # a method: the class is part of the module path
        module = module.rsplit(".", 1)[0]
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 1 / 3 else []
    messages += [
        {"role": "user", "content": rng.choice(ASK).format(q=qualified)},
        {"role": "assistant", "content": sentence},
    ]
    follow = [(MODULE, module), (NAME, name)]
    rng.shuffle(follow)
    for questions, answer in follow[: rng.choice((1, 2))]:
        messages += [{"role": "user", "content": rng.choice(questions)}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def main(root: Path) -> None:
    modules = sorted({m for ms in AREAS.values() for m in ms.split()} | set(EXTRA_MODULES.split()))
    seen, rows = set(), []
    rng = random.Random(2)
    for module_name in modules:
        for qualified, obj in public_objects(module_name):
            doc = inspect.getdoc(obj) if inspect.isroutine(obj) or inspect.isclass(obj) else None
            sentence = first_sentence(doc) if isinstance(doc, str) else None
            if not sentence or qualified in seen or len(sentence) > 160:
                continue
            seen.add(qualified)
            rows.append(conversation(qualified, sentence, rng))
    random.Random(3).shuffle(rows)
    cut = int(len(rows) * 0.9)
    out = root / "stdlib-chat"
    out.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", rows[:cut]), ("test", rows[cut:])):
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    print(f"{len(rows)} conversations ({cut} train) from CPython {sys.version.split()[0]}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data"))
