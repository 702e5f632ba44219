"""Real-text samples from ../shared/data for the curate benchmarks (read at run time, never copied).

English: Project Gutenberg books cut into ~4 KB documents from the middle of each book (the
licence header and footer are identical across books, so they would be duplicates, not prose).
Chinese: PRC laws cut into ~4 KB documents, CMRC 2018 contexts, C3 passages (C3 is
non-commercial: it is only read here, in benchmarks). Code: TheAlgorithms/Python files.
"""

from __future__ import annotations

import json
import lzma
import random
import re
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def chunks(text: str, target: int) -> list[str]:
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    out, cur = [], []
    for p in paras:
        cur.append(p)
        if sum(map(len, cur)) >= target:
            out.append("\n\n".join(cur))
            cur = []
    return out


def english_books(target: int = 4000) -> list[str]:
    docs = []
    for f in sorted((SHARED / "en_gutenberg_books" / "texts").glob("*.txt")):
        text = f.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        start = re.search(r"\*\*\* ?START OF[^\n]*\n", text)
        end = re.search(r"\*\*\* ?END OF", text)
        if start and end:
            text = text[start.end() : end.start()]
        docs.extend(chunks(text, target)[1:-1])
    return docs


def chinese_laws(target: int = 4000) -> list[str]:
    docs = []
    with lzma.open(SHARED / "zh_laws" / "zh_laws.jsonl.xz", "rt", encoding="utf-8") as f:
        for line in f:
            docs.extend(chunks(json.loads(line)["text"].replace("<!-- INFO END -->", ""), target))
    return docs


def chinese_laws_whole() -> list[str]:
    with lzma.open(SHARED / "zh_laws" / "zh_laws.jsonl.xz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def cmrc_contexts() -> list[str]:
    docs = []
    for name in ("cmrc2018_dev.json", "cmrc2018_trial.json"):
        data = json.loads((SHARED / "cmrc2018" / name).read_text(encoding="utf-8"))["data"]
        docs += ["\n\n".join(p["context"] for p in a["paragraphs"]) for a in data]
    return docs


def c3_passages() -> list[str]:
    docs = []
    for name in ("c3-m-train.json", "c3-m-dev.json", "c3-d-train.json", "c3-d-dev.json"):
        docs += ["\n".join(x[0]) for x in json.loads((SHARED / "c3" / name).read_text(encoding="utf-8"))]
    return docs


def python_files() -> list[str]:
    with lzma.open(SHARED / "code_python_thealgorithms" / "python_files.jsonl.xz", "rt", encoding="utf-8") as f:
        return [t for t in (json.loads(line)["content"] for line in f) if len(t.strip()) >= 50]


def sample(docs: list[str], n: int, seed: int = 0) -> list[str]:
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    return docs[:n]
