"""Build data/stdlib-ner: token classification (BIO tags) on CPython stdlib docstring sentences (PSF License).

Rows are {"tokens": [...], "tags": [...]}: sentences from the prose paragraphs of public docstrings (the
module's own and its public classes', functions' and methods') of 161 modules: make_stdlib_topics.AREAS,
make_tiny_gpt_data.EXTRA_MODULES, MORE_MODULES below and `builtins`. Paragraphs that are code, doctests,
indented parameter lists or signature lines are skipped; a paragraph is split into sentences after . ! ?
(not after "e.g." or "i.e.").

Tokens: the sentence is split on whitespace, then the punctuation characters ( ) [ ] { } , . ; : ' " ` * ! ?
leading or trailing a word become tokens of their own, one per character; dotted and underscored names
(os.path.join, file_digest) stay one token, as do the abbreviations "e.g." and "i.e.".

Tags come from lexicons built by introspection — deterministic and context-free (a token gets the same
tag wherever it appears, e.g. the word "list" in "a list of names" is TYPE). All entities are single
tokens, so only B- tags occur (B-MOD, B-EXC, B-CONST, B-TYPE; everything else O):

- MOD: a stdlib module name — a name in sys.stdlib_module_names, a dotted submodule found as a .py file or
  package under the stdlib directory (xml.etree.ElementTree, email.message, ...) or os.path. A dotted name
  is always MOD. A bare name is MOD unless it is in EXCLUDED: names that are English words or that lowercase
  prose uses as ordinary nouns, verbs, formats, protocols or parameter names (string, time, copy, signal,
  socket, queue, json, gzip, ssl, io, ...). `os`, `sys`, `re` and `asyncio` are kept: in docstrings they
  name the modules. Attributes such as os.path.join are not modules and stay O.
- EXC: a builtin exception class (a name in builtins that is a subclass of BaseException), e.g. ValueError.
- CONST: True, False, None, NotImplemented, Ellipsis.
- TYPE: int, float, str, bytes, bytearray, list, dict, tuple, set, frozenset, bool, complex, object,
  memoryview, range.

The split is by docstring (a seeded 85/15 split of the distinct docstrings), and a token sequence is kept
once, so no sentence is in both splits. Each split is then sampled (seeded): ~5% long rows of 60-150
tokens (3-6 consecutive sentences of one docstring joined, to exercise windows beyond max_length), and
~55% of all rows with at least one entity; sentences with the rarer MOD or EXC are drawn first (up to half
of the entity rows), the rest of the entity rows at random. test.conll holds the test rows in CoNLL format.
Deterministic for a given CPython version; run on 3.11.7.
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import json
import random
import re
import sys
import sysconfig
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from make_stdlib_topics import AREAS  # noqa: E402
from make_tiny_gpt_data import EXTRA_MODULES  # noqa: E402

SIZES = {"train": 2500, "test": 450}
LONG_SHARE, ENTITY_SHARE = 0.05, 0.55
PUNCT = set("()[]{},.;:'\"`*!?")
ABBREVIATIONS = {"e.g.", "i.e."}
MORE_MODULES = (
    "asyncio.base_events asyncio.protocols asyncio.subprocess asyncio.transports asyncio.unix_events bdb cgi code "
    "codeop collections.abc contextvars ctypes doctest email.header email.headerregistry email.parser "
    "email.policy filecmp gc graphlib http.cookiejar importlib importlib.abc importlib.util logging.handlers "
    "multiprocessing.connection multiprocessing.managers multiprocessing.shared_memory pdb pkgutil pydoc runpy "
    "symtable sys tokenize unittest.case unittest.mock xml.dom.pulldom xml.sax.handler xml.sax.saxutils zipapp"
)
EXCLUDED = set(
    """
    __main__ abc array base64 bisect bz2 calendar cgi chunk cmd code codecs collections concurrent copy
    crypt csv curses datetime decimal email encodings enum errno fractions glob gzip hmac html http
    inspect io json keyword locale logging lzma mailbox mailcap marshal math mmap multiprocessing netrc
    nt numbers opcode operator pickle pipes platform posix profile pty pwd queue random readline resource
    secrets select selectors shelve signal site socket ssl stat statistics string struct subprocess
    syslog test this threading time token tokenize trace traceback tty turtle types typing uuid venv
    warnings wave weakref xml zlib
    """.split()
)
CONSTANTS = {"True", "False", "None", "NotImplemented", "Ellipsis"}
TYPES = set("int float str bytes bytearray list dict tuple set frozenset bool complex object memoryview range".split())
EXCEPTIONS = {n for n, o in vars(builtins).items() if isinstance(o, type) and issubclass(o, BaseException)}
SIGNATURE = re.compile(r"^[\w.]+\(.*\)\s*(->.*)?$")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`\"'(])")


def module_names() -> set[str]:
    """Top-level stdlib module names plus dotted submodules found under the stdlib directory."""
    names = set(sys.stdlib_module_names) | {"os.path"}
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if len(parts) > 1 and parts[0] in sys.stdlib_module_names and all(p.isidentifier() for p in parts):
            names.add(".".join(parts))
    return names


MODULES = module_names()


def tag(token: str) -> str:
    if token in MODULES and ("." in token or token not in EXCLUDED):
        return "B-MOD"
    if token in EXCEPTIONS:
        return "B-EXC"
    if token in CONSTANTS:
        return "B-CONST"
    if token in TYPES:
        return "B-TYPE"
    return "O"


def tokenize(sentence: str) -> list[str]:
    """Whitespace words, with leading/trailing punctuation split off one character per token."""
    tokens = []
    for word in sentence.split():
        lead, trail = [], []
        while word and word[0] in PUNCT:
            lead.append(word[0])
            word = word[1:]
        while word and word[-1] in PUNCT and word not in ABBREVIATIONS:
            trail.append(word[-1])
            word = word[:-1]
        tokens += lead + ([word] if word else []) + trail[::-1]
    return tokens


def sentences(doc: str) -> list[str]:
    """The sentences of a docstring's prose paragraphs, in order."""
    out = []
    for paragraph in inspect.cleandoc(doc).split("\n\n"):
        lines = [line for line in paragraph.splitlines() if line.strip()]
        if (
            not lines
            or any(line[0].isspace() or line.lstrip().startswith((">>>", "...", "-", "*", "|", ":")) for line in lines)
            or all(SIGNATURE.match(line.strip()) for line in lines)
            or "::" in paragraph
        ):
            continue
        pieces = SENTENCE_END.split(" ".join(line.strip() for line in lines))
        merged: list[str] = []
        for piece in pieces:
            if merged and merged[-1].split()[-1].lstrip("([{\"'`*") in ABBREVIATIONS:
                merged[-1] += " " + piece
            else:
                merged.append(piece)
        out += merged
    return out


def prose(tokens: list[str]) -> bool:
    """A real sentence: starts with a capital letter, ends with . or ?, is mostly words."""
    words = [t for t in tokens if re.search(r"[A-Za-z]", t)]
    return bool(
        tokens
        and tokens[0][0].isupper()
        and tokens[-1] in (".", "?")
        and len(words) >= 0.6 * len(tokens)
        and not any(t in (">>>", "=", "==", "->") for t in tokens)
    )


def public_docstrings(module_name: str):
    """(name, docstring) of a module, its public classes and functions, and their public methods."""
    module = importlib.import_module(module_name)
    yield module_name, module.__doc__
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", module_name) != module.__name__:
            continue
        yield f"{module_name}.{name}", getattr(obj, "__doc__", None)
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_"):
                    yield f"{module_name}.{name}.{attr}", getattr(member, "__doc__", None)


def row(tokens: list[str]) -> dict:
    return {"tokens": tokens, "tags": [tag(t) for t in tokens]}


def main(out_dir: Path) -> None:
    """Write train.jsonl, test.jsonl and test.conll under out_dir."""
    modules = sorted(
        {m for ms in AREAS.values() for m in ms.split()}
        | set(EXTRA_MODULES.split())
        | set(MORE_MODULES.split())
        | {"builtins"}
    )
    docs: dict[str, str] = {}  # distinct docstring -> first place it was found
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in modules:
            for where, doc in public_docstrings(module_name):
                if isinstance(doc, str) and doc.strip():
                    docs.setdefault(doc, where)
    ordered = sorted(docs, key=lambda d: (docs[d], d))
    rng = random.Random(0)
    split_of = {doc: "test" if rng.random() < 0.15 else "train" for doc in ordered}

    seen: set[tuple[str, ...]] = set()
    pools = {split: {"long": [], "entity": [], "plain": []} for split in SIZES}
    for doc in ordered:
        pool = pools[split_of[doc]]
        tokenized = [tokenize(s) for s in sentences(doc)]
        tokenized = [t for t in tokenized if prose(t)]
        for tokens in tokenized:
            if 5 <= len(tokens) <= 40 and tuple(tokens) not in seen:
                seen.add(tuple(tokens))
                r = row(tokens)
                pool["entity" if any(t != "O" for t in r["tags"]) else "plain"].append(r)
        start = 0
        while start + 3 <= len(tokenized):  # non-overlapping runs of 3-6 consecutive sentences
            for n in range(3, 7):
                joined = [t for s in tokenized[start : start + n] for t in s]
                if 60 <= len(joined) <= 150 and tuple(joined) not in seen:
                    seen.add(tuple(joined))
                    pool["long"].append(row(joined))
                    start += n
                    break
            else:
                start += 1

    out_dir.mkdir(parents=True, exist_ok=True)
    for split, size in SIZES.items():
        pool = pools[split]
        n_long = round(size * LONG_SHARE)
        rows = rng.sample(pool["long"], n_long)
        n_entity = round(size * ENTITY_SHARE) - sum(any(t != "O" for t in r["tags"]) for r in rows)
        rare = [r for r in pool["entity"] if {"B-MOD", "B-EXC"} & set(r["tags"])]  # kept first, up to half
        rows += rng.sample(rare, n_rare := min(len(rare), n_entity // 2))
        rows += rng.sample([r for r in pool["entity"] if r not in rare], n_entity - n_rare)
        rows += rng.sample(pool["plain"], size - n_long - n_entity)
        rng.shuffle(rows)
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if split == "test":
            with open(out_dir / "test.conll", "w", encoding="utf-8") as f:
                f.write("-DOCSTART-\tO\n\n")
                f.writelines("".join(f"{t}\t{g}\n" for t, g in zip(r["tokens"], r["tags"])) + "\n" for r in rows)
        with_entity = sum(any(t != "O" for t in r["tags"]) for r in rows)
        print(
            f"{split}: {len(rows)} rows ({n_long} long, {with_entity / len(rows):.1%} with an entity) from pools "
            f"of {len(pool['long'])} long / {len(pool['entity'])} entity / {len(pool['plain'])} plain"
        )
    print(f"{len(docs)} docstrings of {len(modules)} modules, CPython {sys.version.split()[0]} -> {out_dir}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data/stdlib-ner"))
