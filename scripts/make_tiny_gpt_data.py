"""Build the tiny-gpt corpora from CPython's own documentation text (PSF License).

- data/python-docs/{train,eval}.txt: one paragraph per line, from the language reference shipped as
  pydoc_data.topics and from the docstrings of ~100 stdlib modules (unlabeled pretraining text).
- data/docstring-names/{train,test}.jsonl: prompt = the first sentence of a public function's or
  method's docstring, response = the module that defines it (e.g. "textwrap"), for generative SFT.
Deterministic for a given CPython version; run on 3.11.7.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
import sys
from pathlib import Path

from make_stdlib_topics import AREAS, first_sentence

EXTRA_MODULES = (
    "abc argparse array ast base64 calendar collections contextlib copy dataclasses datetime dis enum "
    "functools getopt hashlib hmac inspect itertools logging mimetypes pprint secrets string textwrap time "
    "timeit traceback types typing unittest uuid warnings weakref zlib zoneinfo"
)


def paragraphs(text: str) -> list[str]:
    """Prose paragraphs (joined lines), dropping grammar blocks, headings and code."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if (
            not lines
            or lines[0].startswith((" ", "\t", ">>>", "*", "=", "-"))
            or set(lines[-1].strip()) <= set("*=-~^")
        ):
            continue
        para = " ".join(line.strip() for line in lines)
        if len(para) >= 40 and para[0].isalpha():
            out.append(para)
    return out


def public_objects(module_name: str):
    """(qualified name, object) for public functions, classes and methods defined in a module."""
    module = importlib.import_module(module_name)
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        yield f"{module_name}.{name}", obj
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and callable(member):
                    yield f"{module_name}.{name}.{attr}", member


def main(root: Path) -> None:
    import pydoc_data.topics

    modules = sorted({m for ms in AREAS.values() for m in ms.split()} | set(EXTRA_MODULES.split()))
    corpus = [p for key in sorted(pydoc_data.topics.topics) for p in paragraphs(pydoc_data.topics.topics[key])]
    pairs: dict[str, set[str]] = {}
    for module_name in modules:
        module = importlib.import_module(module_name)
        corpus += paragraphs(module.__doc__ or "")
        for _qualified, obj in public_objects(module_name):
            doc = inspect.getdoc(obj) if inspect.isroutine(obj) or inspect.isclass(obj) else None
            if not isinstance(doc, str):
                continue
            corpus += paragraphs(doc)
            sentence = first_sentence(doc)
            if sentence and inspect.isroutine(obj):
                pairs.setdefault(sentence, set()).add(module_name)
    corpus = list(dict.fromkeys(corpus))
    random.Random(0).shuffle(corpus)
    cut = int(len(corpus) * 0.95)
    docs = root / "python-docs"
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "train.txt").write_text("\n".join(corpus[:cut]) + "\n", encoding="utf-8")
    (docs / "eval.txt").write_text("\n".join(corpus[cut:]) + "\n", encoding="utf-8")
    rows = [{"prompt": s, "response": next(iter(n))} for s, n in sorted(pairs.items()) if len(n) == 1]
    random.Random(1).shuffle(rows)
    cut = int(len(rows) * 0.9)
    names = root / "docstring-names"
    names.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", rows[:cut]), ("test", rows[cut:])):
        (names / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    print(f"{len(corpus)} paragraphs, {len(rows)} prompt/response pairs from CPython {sys.version.split()[0]}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data"))
