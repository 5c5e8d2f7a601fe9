"""Build the quickstart text-classification set: real docstring sentences from CPython's stdlib.

Each row is the first sentence of a public docstring (module, class, function or method) labelled by
the stdlib area it documents. The text is CPython's own (PSF License); the script is deterministic for
a given CPython version and was run on 3.11.7 to produce data/stdlib-topics/.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
import sys
from pathlib import Path

AREAS = {
    "text": "string re textwrap difflib unicodedata html html.parser codecs locale gettext shlex fnmatch stringprep",
    "math": "math cmath statistics decimal fractions random numbers operator bisect heapq",
    "files": "os os.path pathlib shutil glob tempfile io zipfile tarfile gzip bz2 lzma filecmp stat fileinput",
    "network": "socket ssl http.client http.server http.cookies http.cookiejar urllib.request "
    "urllib.parse smtplib ftplib poplib imaplib xmlrpc.client socketserver ipaddress mailbox "
    "email.message email.utils",
    "concurrency": "threading multiprocessing.pool multiprocessing.process multiprocessing.queues "
    "multiprocessing.synchronize asyncio.tasks asyncio.events asyncio.queues asyncio.locks "
    "asyncio.streams asyncio.futures concurrent.futures._base concurrent.futures.thread queue "
    "subprocess sched selectors signal",
    "formats": "json json.decoder json.encoder csv pickle xml.etree.ElementTree xml.dom.minidom "
    "configparser plistlib base64 struct sqlite3 tomllib binascii",
}
SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def first_sentence(doc: str) -> str | None:
    """Return the docstring's first sentence, or None when it is not prose."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    sentence = SENTENCE_END.split(paragraph)[0].strip()
    if not (25 <= len(sentence) <= 300) or "(" in sentence[:15] or not sentence[0].isupper():
        return None
    return sentence


def docstrings(module_name: str):
    """Yield the docstrings of a module and of its public classes, functions and methods."""
    module = importlib.import_module(module_name)
    yield module.__doc__
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", module_name) != module.__name__:
            continue
        yield getattr(obj, "__doc__", None)
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_"):
                    yield getattr(member, "__doc__", None)


def main(out_dir: Path) -> None:
    """Write train.jsonl and test.jsonl (80/20, seeded) under out_dir."""
    labels_of: dict[str, set[str]] = {}
    for area, modules in AREAS.items():
        for module_name in modules.split():
            for doc in docstrings(module_name):
                if isinstance(doc, str) and (sentence := first_sentence(doc)):
                    labels_of.setdefault(sentence, set()).add(area)
    rows = [{"text": s, "label": next(iter(a))} for s, a in sorted(labels_of.items()) if len(a) == 1]
    random.Random(0).shuffle(rows)
    cut = int(len(rows) * 0.8)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", rows[:cut]), ("test", rows[cut:])):
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
    print(f"{len(rows)} rows from CPython {sys.version.split()[0]} -> {out_dir}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data/stdlib-topics"))
