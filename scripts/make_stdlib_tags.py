"""Build data/stdlib-tags: multi-label classification of CPython stdlib docstring sentences (PSF License).

Each row is the first prose sentence of a public docstring (the module's own, or a public class's,
function's or method's defined in it or in its C accelerator `_name`, or listed in its `__all__`) and the
tags of the MODULE it comes from. The tags are assigned by hand below, 1 to 3 per module, from a fixed
vocabulary of nine: files, text, network, concurrency, formats, math, compression, security, time
(e.g. gzip -> files, compression; ssl -> network, security; calendar -> time, text). Signature lines such
as "time() -> floating point number" that open C docstrings are skipped. A sentence found in modules with
different tag sets is dropped; one found twice with the same tags is kept once. Seeded 85/15 split of the
distinct sentences. Deterministic for a given CPython version; run on 3.11.7.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from make_stdlib_topics import first_sentence  # noqa: E402

TAGS = ("files", "text", "network", "concurrency", "formats", "math", "compression", "security", "time")
MODULE_TAGS = {
    # files and compression
    "os.path": ["files"],
    "pathlib": ["files"],
    "shutil": ["files"],
    "tempfile": ["files", "security"],
    "fileinput": ["files", "text"],
    "fnmatch": ["files", "text"],
    "gzip": ["files", "compression"],
    "bz2": ["files", "compression"],
    "lzma": ["files", "compression"],
    "zlib": ["compression"],
    "zipfile": ["files", "compression", "formats"],
    "tarfile": ["files", "compression", "formats"],
    "zipimport": ["files", "compression"],
    "mailbox": ["files", "formats"],
    # formats
    "json.decoder": ["formats", "text"],
    "json.encoder": ["formats", "text"],
    "csv": ["formats", "text"],
    "xml.etree.ElementTree": ["formats", "text"],
    "xml.dom.minidom": ["formats", "text"],
    "configparser": ["formats", "files"],
    "sqlite3": ["formats", "files"],
    "base64": ["formats"],
    "quopri": ["formats", "text"],
    # text
    "re": ["text"],
    "difflib": ["text"],
    "textwrap": ["text"],
    "codecs": ["text", "formats"],
    "html.parser": ["text", "formats"],
    # network
    "socket": ["network"],
    "ssl": ["network", "security"],
    "http.server": ["network"],
    "urllib.parse": ["network", "text"],
    "urllib.request": ["network"],
    "ftplib": ["network", "files"],
    "smtplib": ["network"],
    "imaplib": ["network"],
    "xmlrpc.client": ["network", "formats"],
    "socketserver": ["network", "concurrency"],
    "email.message": ["network", "formats"],
    "email.utils": ["network", "formats"],
    # concurrency
    "threading": ["concurrency"],
    "queue": ["concurrency"],
    "subprocess": ["concurrency"],
    "selectors": ["concurrency", "network"],
    "asyncio.tasks": ["concurrency"],
    "asyncio.streams": ["concurrency", "network"],
    "asyncio.transports": ["concurrency", "network"],
    "asyncio.base_events": ["concurrency", "network"],
    "asyncio.sslproto": ["concurrency", "network", "security"],
    # math, security, time
    "math": ["math"],
    "statistics": ["math"],
    "decimal": ["math"],
    "secrets": ["security", "math"],
    "hashlib": ["security"],
    "hmac": ["security"],
    "datetime": ["time"],
    "time": ["time"],
    "calendar": ["time", "text"],
    "zoneinfo": ["time"],
    "sched": ["time", "concurrency"],
}
SIGNATURE = re.compile(r"^[\w.]+\(.*\)\s*(->.*)?$")


def prose_first_sentence(doc: str) -> str | None:
    """first_sentence() of a docstring, after any leading "name(args) -> result" signature paragraph."""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    while len(paragraphs) > 1 and all(SIGNATURE.match(line.strip()) for line in paragraphs[0].splitlines()):
        paragraphs = paragraphs[1:]
    return first_sentence("\n\n".join(paragraphs))


def module_docstrings(module_name: str):
    """The module's docstring, then those of its public classes/functions and their public methods."""
    module = importlib.import_module(module_name)
    homes = {module.__name__, "_" + module.__name__.rsplit(".", 1)[-1]}
    exported = set(getattr(module, "__all__", ()))
    yield module.__doc__
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) not in homes and name not in exported:
            continue
        yield getattr(obj, "__doc__", None)
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_"):
                    yield getattr(member, "__doc__", None)


def main(out_dir: Path) -> None:
    """Write train.jsonl and test.jsonl (85/15, seeded) under out_dir."""
    assert all(1 <= len(t) <= 3 and set(t) <= set(TAGS) for t in MODULE_TAGS.values())
    tags_of: dict[str, set[tuple[str, ...]]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name, tags in sorted(MODULE_TAGS.items()):
            for doc in module_docstrings(module_name):
                if isinstance(doc, str) and (sentence := prose_first_sentence(doc)):
                    tags_of.setdefault(sentence, set()).add(tuple(sorted(tags, key=TAGS.index)))
    rows = [{"text": s, "tags": list(next(iter(t)))} for s, t in sorted(tags_of.items()) if len(t) == 1]
    random.Random(0).shuffle(rows)
    cut = int(len(rows) * 0.85)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", rows[:cut]), ("test", rows[cut:])):
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
    multi = sum(len(r["tags"]) > 1 for r in rows)
    print(
        f"{len(rows)} rows ({cut} train), {multi / len(rows):.1%} with 2+ tags, from CPython "
        f"{sys.version.split()[0]} -> {out_dir}"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data/stdlib-tags"))
