"""Build data/docs-en-es: English -> Spanish parallel text from the Spanish translation of the Python docs.

Source: a checkout of https://github.com/python/python-docs-es (gettext .po catalogs: each entry pairs a
paragraph of the English docs, `msgid`, with its human translation, `msgstr`; "distributed under the same
license as the Python package", i.e. the PSF License). Run: `python scripts/make_docs_translation.py DIR`.

Pairs: translated, non-fuzzy entries whose text is prose once reST markup is unwrapped (:func:`abs` -> abs,
``x`` -> x, *a* -> a, `text <url>`_ -> text), 4 to 24 English words, no code sample, no line-block, and a
translation that differs from the source. Duplicates (same English) keep the first. The split is by catalog
file (a seeded ~90/10 split of the files), so no test sentence comes from a page seen in training.

Also writes `text.txt` / `text-eval.txt`: unlabeled monolingual prose in both languages for span-corruption
pretraining — every translated paragraph of the *train* files (English and Spanish, one per line, 6 to 120
words; the eval file draws from the test files), so pretraining never reads a test page.
"""

from __future__ import annotations

import ast
import json
import random
import re
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "docs-en-es"
TEST_SHARE, SEED = 0.10, 13
PAIR_WORDS = (4, 24)
TEXT_WORDS = (6, 120)
MAX_PAIRS, MAX_TEXT_LINES = 9000, 8000

ROLE = re.compile(r":[\w:.+-]+:`(?:[^`<]*<)?~?([^`>]+)>?`")  # :func:`abs`, :ref:`title <label>` -> label text
LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`_{1,2}")  # `text <url>`_
LITERAL = re.compile(r"``([^`]+)``")
EMPHASIS = re.compile(r"(\*{1,2})([^*\s][^*]*?)\1")
INTERPRETED = re.compile(r"`([^`]+)`_?")


def entries(path: Path) -> list[tuple[str, str, bool]]:
    """(msgid, msgstr, fuzzy) for each entry of a .po catalog (C-escaped strings, continued over lines)."""
    found, fields, current, fuzzy = [], {}, None, False

    def flush() -> None:
        nonlocal fields, fuzzy
        if "msgid" in fields and "msgstr" in fields:
            found.append((fields["msgid"], fields["msgstr"], fuzzy))
        fields, fuzzy = {}, False

    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            flush()
        elif line.startswith("#,") and "fuzzy" in line:
            fuzzy = True
        elif line.startswith("#"):
            continue
        elif line.startswith(("msgid ", "msgstr ")):
            current, value = line.split(" ", 1)
            fields[current] = unquote(value)
        elif line.startswith('"') and current:
            fields[current] += unquote(line)
    flush()
    return found


def unquote(value: str) -> str:
    """A C-escaped .po string ("...") as text; a malformed one (a few catalogs have them) as empty text."""
    try:
        return str(ast.literal_eval(value))
    except (SyntaxError, ValueError):
        return ""


def plain(text: str) -> str:
    """The text with reST inline markup unwrapped and whitespace collapsed."""
    text = ROLE.sub(lambda m: m.group(1).lstrip("~!."), text)
    text = LINK.sub(r"\1", text)
    text = LITERAL.sub(r"\1", text)
    text = EMPHASIS.sub(r"\2", text)
    text = INTERPRETED.sub(r"\1", text)
    return " ".join(text.split())


def prose(source: str, target: str) -> bool:
    """True for a translated paragraph of running text (not code, a heading-only fragment or markup)."""
    if not target or source == target or "::" in source or ">>>" in source or "\n\n" in source:
        return False
    return not any(mark in source for mark in ("|", "..", "=====", "-----", "$ ", "{", "}"))


def main(source: Path) -> None:
    files = sorted(p for p in source.rglob("*.po") if ".overrides" not in p.parts)
    rng = random.Random(SEED)
    shuffled = files[:]
    rng.shuffle(shuffled)
    test_files = set(shuffled[: round(len(files) * TEST_SHARE)])
    pairs: dict[str, list[dict]] = {"train": [], "test": []}
    text: dict[str, list[str]] = {"train": [], "test": []}
    seen: set[str] = set()
    for path in files:
        split = "test" if path in test_files else "train"
        for msgid, msgstr, fuzzy in entries(path):
            if fuzzy or not msgid or not prose(msgid, msgstr):
                continue
            en, es = plain(msgid), plain(msgstr)
            words = len(en.split())
            if TEXT_WORDS[0] <= words <= TEXT_WORDS[1]:
                text[split] += [en, es]
            if PAIR_WORDS[0] <= words <= PAIR_WORDS[1] and en not in seen and en != es:
                seen.add(en)
                pairs[split].append({"translation": {"en": en, "es": es}})
    OUT.mkdir(parents=True, exist_ok=True)
    for split, rows in pairs.items():
        rows = rows if split == "train" else rng.sample(rows, min(len(rows), 600))
        rows = rng.sample(rows, min(len(rows), MAX_PAIRS)) if split == "train" else rows
        with open(OUT / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        print(f"{split}: {len(rows)} pairs")
    for split, name in (("train", "text.txt"), ("test", "text-eval.txt")):
        lines = list(dict.fromkeys(text[split]))
        lines = rng.sample(lines, min(len(lines), MAX_TEXT_LINES if split == "train" else 800))
        (OUT / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"{name}: {len(lines)} lines")
    commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True)
    print(f"source commit: {commit.stdout.strip() or 'unknown'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
