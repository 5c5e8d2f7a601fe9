"""Build data/docstring-pairs: sentence pairs from CPython's stdlib docstrings (PSF License).

Each row pairs the first sentences of two different public docstrings from the modules of
make_stdlib_topics.AREAS and grades how related their sources are, like STS-B:

- label "same-module"    (score 2.0): both sentences document the same module;
- label "same-area"      (score 1.0): same area of the library (e.g. both `files`), different modules;
- label "different-area" (score 0.0): different areas.

`overlap` is the Jaccard overlap of the two sentences' lowercase word sets (regex \\w+), rounded to 4
decimals — a cheap lexical feature, not a target. The three labels are balanced (a third each, per split).
The split is by sentence: the sentences are shuffled (seeded) and 15% of them are kept for test, so no
test pair shares a sentence with a train pair. A sentence found in more than one module is dropped.
Usable for pair classification (`label`) and regression (`score`). Deterministic for a given CPython
version; run on 3.11.7.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from make_stdlib_topics import AREAS, docstrings, first_sentence  # noqa: E402

WORD = re.compile(r"\w+")
SCORES = {"same-module": 2.0, "same-area": 1.0, "different-area": 0.0}
SIZES = {"train": 2400, "test": 400}


def overlap(a: str, b: str) -> float:
    """Jaccard overlap of the lowercase word sets of two sentences."""
    wa, wb = set(WORD.findall(a.lower())), set(WORD.findall(b.lower()))
    return round(len(wa & wb) / len(wa | wb), 4) if wa | wb else 0.0


def sample_pairs(sentences: list[tuple[str, str, str]], size: int, rng: random.Random) -> list[dict]:
    """`size` distinct pairs over (sentence, module, area) triples, a third of each label."""
    by_module: dict[str, list[str]] = {}
    by_area: dict[str, list[str]] = {}
    for sentence, module, area in sentences:
        by_module.setdefault(module, []).append(sentence)
        by_area.setdefault(area, []).append(sentence)
    where = {s: (m, a) for s, m, a in sentences}
    labels = list(SCORES)
    wanted = {label: size // 3 + (i < size % 3) for i, label in enumerate(labels)}
    seen: set[frozenset[str]] = set()
    rows = []
    for label in labels:
        made = 0
        while made < wanted[label]:
            s1 = rng.choice(sentences)[0]
            module, area = where[s1]
            if label == "same-module":
                pool = [s for s in by_module[module] if s != s1]
            elif label == "same-area":
                pool = [s for s in by_area[area] if where[s][0] != module]
            else:
                pool = [s for a, ss in sorted(by_area.items()) if a != area for s in ss]
            if not pool:
                continue
            s2 = rng.choice(pool)
            if frozenset((s1, s2)) in seen:
                continue
            seen.add(frozenset((s1, s2)))
            if rng.random() < 0.5:
                s1, s2 = s2, s1
            rows.append(
                {"sentence1": s1, "sentence2": s2, "label": label, "score": SCORES[label], "overlap": overlap(s1, s2)}
            )
            made += 1
    rng.shuffle(rows)
    return rows


def main(out_dir: Path) -> None:
    """Write train.jsonl and test.jsonl under out_dir."""
    sources: dict[str, set[tuple[str, str]]] = {}
    for area, modules in sorted(AREAS.items()):
        for module_name in sorted(modules.split()):
            for doc in docstrings(module_name):
                if isinstance(doc, str) and (sentence := first_sentence(doc)):
                    sources.setdefault(sentence, set()).add((module_name, area))
    sentences = [(s, *next(iter(src))) for s, src in sorted(sources.items()) if len(src) == 1]
    rng = random.Random(0)
    rng.shuffle(sentences)
    cut = int(len(sentences) * 0.85)
    parts = {"train": sorted(sentences[:cut]), "test": sorted(sentences[cut:])}
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, part in parts.items():
        rows = sample_pairs(part, SIZES[split], rng)
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        print(f"{split}: {len(rows)} pairs over {len(part)} sentences")
    print(f"{len(sentences)} sentences from CPython {sys.version.split()[0]} -> {out_dir}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data/docstring-pairs"))
