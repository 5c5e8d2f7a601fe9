"""Build data/stdlib-qa: extractive question answering (SQuAD v2 format) on CPython stdlib docstrings (PSF License).

Each context is a passage about one stdlib module built from its real docstrings: the first paragraph of
the module docstring (when it is prose), then one line "name: <first sentence of its docstring>" for each
of a selection of the module's public functions, classes and methods (methods named Class.method), in the
module's (sorted) order, lines joined with "\\n". Most contexts have 4-12 entries (fewer more often); about
a fifth are long (entries added until the passage is over 2,000-2,300 characters, i.e. several hundred
tokens), so that answers often lie beyond the first 384 tokens: in a long context, the questions alternate
between entries that start after character 1,500 and entries before it. A module with enough entries gives several
contexts (different selections): ceil(entries / 8), at most 5. The sizes are chosen so the two files stay
under 1.5 MB (every question carries its whole context).

Each context gets 3 or 4 questions from templates ("What does {name} do?", "In the {module} docs, what is
said about {name}?", ...). An answerable question asks about an entry of the context; its answer is that
entry's sentence, with answer_start its character offset (context[start:start + len(text)] == text, and the
sentence occurs once in the context). About a quarter are unanswerable: they ask about a public entry of the
same module that is not in the context (its name does not occur in the context at all); their answers are
{"text": [], "answer_start": []}. The split is by module (a seeded ~85/15 split of the modules by question
count, stratified by whether a module has long contexts), so the test contexts come from modules never seen
in training. Each module draws from its own seeded generator. Deterministic for a given CPython version; run
on 3.11.7.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import random
import re
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from make_stdlib_tags import SIGNATURE, prose_first_sentence  # noqa: E402
from make_stdlib_topics import AREAS  # noqa: E402
from make_tiny_gpt_data import EXTRA_MODULES  # noqa: E402

MORE_MODULES = (
    "asyncio.base_events asyncio.protocols asyncio.transports bdb cgi code collections.abc doctest "
    "email.policy gc importlib.abc importlib.util logging.handlers multiprocessing.connection "
    "multiprocessing.managers pkgutil pydoc sys tokenize unittest.case unittest.mock xml.sax.handler"
)
TEMPLATES = (
    "What does {name} do?",
    "In the {module} docs, what is said about {name}?",
    "What is {name} used for?",
    "According to the {module} documentation, what is {name}?",
)
TEST_SHARE, UNANSWERABLE_SHARE = 0.15, 0.27
LATE_CHARS = 1500  # about 384 tokens: in a long context, every other question asks about an entry beyond it
LONG_CHARS, LONG_CHANCE = 2000, 0.5  # a module with enough entries makes a context long with LONG_CHANCE
CONTEXTS_MAX, ENTRIES_PER_CONTEXT = 5, 8  # a module gives ceil(entries / 8) contexts, at most 5


def intro(module) -> str | None:
    """The module docstring's first paragraph, joined into one line, when it is prose."""
    doc = inspect.cleandoc(module.__doc__ or "")
    lines = [line.strip() for line in doc.split("\n\n")[0].splitlines()]
    text = " ".join(lines)
    if not lines or not text[:1].isupper() or len(text) < 15 or any(SIGNATURE.match(line) for line in lines):
        return None
    if any(line.startswith((">>>", "-", "*", "=")) or set(line) <= set("=-~^*") for line in lines):
        return None
    return text


def entries(module) -> list[tuple[str, str]]:
    """(name, first sentence) of the module's public functions, classes and their methods."""
    homes = {module.__name__, "_" + module.__name__.rsplit(".", 1)[-1]}
    exported = set(getattr(module, "__all__", ()))
    out = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) not in homes and name not in exported:
            continue
        candidates = [(name, obj)]
        if inspect.isclass(obj):
            candidates += [
                (f"{name}.{a}", m) for a, m in sorted(vars(obj).items()) if not a.startswith("_") and callable(m)
            ]
        for qualified, member in candidates:
            doc = getattr(member, "__doc__", None)
            if isinstance(doc, str) and (sentence := prose_first_sentence(doc)):
                out.append((qualified, sentence))
    seen: set[str] = set()  # one entry per sentence (aliases share docstrings)
    return [(n, s) for n, s in out if not (s in seen or seen.add(s))]


def mentions(name: str, text: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", text) is not None


def contexts_of(module_name: str, rng: random.Random) -> list[dict]:
    """The contexts (each with its questions) of one module."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(module_name)
        head = intro(module)
        pool = [(n, s) for n, s in entries(module) if not (head and s in head)]
    if len(pool) < 4:
        return []
    lines = [f"{n}: {s}" for n, s in pool]
    can_be_long = sum(len(line) + 1 for line in lines) + len(head or "") > LONG_CHARS + 300
    out, seen_contexts = [], set()
    for c in range(min(CONTEXTS_MAX, math.ceil(len(pool) / ENTRIES_PER_CONTEXT))):
        if can_be_long and rng.random() < LONG_CHANCE:
            order = rng.sample(range(len(pool)), len(pool))
            target, chosen, size = rng.randint(LONG_CHARS, LONG_CHARS + 300), [], len(head or "")
            for i in order:
                if size > target or len(chosen) == 40:
                    break
                chosen.append(i)
                size += len(lines[i]) + 1
        else:
            chosen = rng.sample(range(len(pool)), rng.randint(4, min(rng.randint(4, 12), len(pool))))
        chosen.sort()
        context = "\n".join(([head] if head else []) + [lines[i] for i in chosen])
        if context in seen_contexts:
            continue
        seen_contexts.add(context)
        offsets, position = {}, len(head) + 1 if head else 0
        for i in chosen:
            offsets[i] = position + len(pool[i][0]) + 2
            position += len(lines[i]) + 1
        askable = [i for i in chosen if context.count(pool[i][1]) == 1]
        absent = [n for j, (n, _) in enumerate(pool) if j not in offsets and not mentions(n, context)]
        rng.shuffle(askable)
        late = [i for i in askable if offsets[i] > LATE_CHARS]  # asked first: every other question, from the end
        early = [i for i in askable if offsets[i] <= LATE_CHARS]
        askable = [i for pair in zip(early, late) for i in pair] + early[len(late) :] + late[len(early) :]
        askable.reverse()
        questions = []
        for q in range(rng.choice((3, 4, 4))):
            template = rng.choice(TEMPLATES)
            if absent and rng.random() < UNANSWERABLE_SHARE:
                name = absent.pop(rng.randrange(len(absent)))
                answers = {"text": [], "answer_start": []}
            elif askable:
                i = askable.pop()
                name, text = pool[i]
                assert context[offsets[i] : offsets[i] + len(text)] == text
                answers = {"text": [text], "answer_start": [offsets[i]]}
            else:
                break
            questions.append(
                {
                    "id": f"{module_name}-{c}-{q}",
                    "question": template.format(name=name, module=module_name),
                    "context": context,
                    "answers": answers,
                }
            )
        out.append(questions)
    return out


def main(out_dir: Path) -> None:
    """Write train.jsonl and test.jsonl under out_dir."""
    modules = sorted(
        {m for ms in AREAS.values() for m in ms.split()} | set(EXTRA_MODULES.split()) | set(MORE_MODULES.split())
    )
    rng = random.Random(0)
    by_module = {
        m: [r for questions in contexts_of(m, random.Random(f"stdlib-qa:{m}")) for r in questions] for m in modules
    }
    by_module = {m: rows for m, rows in by_module.items() if rows}
    test_modules: set[str] = set()
    for has_long in (False, True):  # stratified: modules with long contexts, and the others, split ~85/15
        group = [m for m in sorted(by_module) if any(len(r["context"]) > LONG_CHARS for r in by_module[m]) == has_long]
        rng.shuffle(group)
        total, taken = sum(len(by_module[m]) for m in group), 0
        for m in group:
            if taken + len(by_module[m]) <= TEST_SHARE * total:
                test_modules.add(m)
                taken += len(by_module[m])
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows = [r for m in sorted(by_module) if (m in test_modules) == (split == "test") for r in by_module[m]]
        rng.shuffle(rows)
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        contexts = {r["context"] for r in rows}
        print(
            f"{split}: {len(rows)} questions ({sum(not r['answers']['text'] for r in rows)} unanswerable), "
            f"{len(contexts)} contexts ({sum(len(c) > LONG_CHARS for c in contexts)} over {LONG_CHARS:,} chars), "
            f"{len({r['id'].rsplit('-', 2)[0] for r in rows})} modules"
        )
    print(f"from CPython {sys.version.split()[0]} -> {out_dir}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data/stdlib-qa"))
