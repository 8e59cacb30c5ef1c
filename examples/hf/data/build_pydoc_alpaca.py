"""Rebuild pydoc_alpaca.jsonl: instruction/response pairs drawn from the docstrings of Python's standard
library, in the Alpaca format (`instruction`, `input`, `output`) that the guide's §12.1 example reads.

The file is shipped so every run trains on the same text whatever the Python version; run this only to
regenerate it:  python examples/hf/data/build_pydoc_alpaca.py
"""
from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

MODULES = ["json", "os", "os.path", "shutil", "itertools", "functools", "collections", "re", "string", "math",
           "statistics", "random", "textwrap", "difflib", "heapq", "bisect", "operator", "pathlib", "datetime",
           "calendar", "csv", "zipfile", "tarfile", "gzip", "hashlib", "base64", "binascii", "struct", "copy",
           "pprint", "enum", "fractions", "decimal", "urllib.parse", "html", "uuid", "tempfile", "glob",
           "fnmatch", "secrets", "time", "contextlib", "inspect", "argparse", "logging", "threading", "queue",
           "subprocess", "socket", "email.utils", "typing", "dataclasses", "abc", "io", "pickle", "shlex",
           "platform", "locale", "codecs", "unicodedata", "zlib", "sqlite3", "array", "weakref", "types"]
MAX_CHARS = 600
OUT = Path(__file__).with_name("pydoc_alpaca.jsonl")


def first_paragraph(doc: str) -> str:
    text = inspect.cleandoc(doc).split("\n\n")[0]
    return " ".join(text.split())[:MAX_CHARS]


def examples() -> list[dict[str, str]]:
    rows = []
    for name in MODULES:
        module = importlib.import_module(name)
        for attr in sorted(getattr(module, "__all__", None) or dir(module)):
            obj = getattr(module, attr, None)
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj)
            if not doc or len(doc) < 40:
                continue
            kind = "class" if inspect.isclass(obj) else "function"
            rows.append({"instruction": f"Explain what the Python {kind} `{name}.{attr}` does.", "input": "",
                         "output": first_paragraph(doc)})
    return rows


if __name__ == "__main__":
    rows = examples()
    with OUT.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} examples to {OUT}")
