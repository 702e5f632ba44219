"""Build the embedded default corpus in data/default/ from ../shared/data.

Deterministic: the same shared data gives byte-identical files. Only permissively
licensed sources are used (see data/default/NOTICE). Run from the repo root:

    python scripts/make_default_data.py [--shared ../shared/data]

Each domain gets train.jsonl and valid.jsonl, one {"id", "source", "text"} object a line.
Every 12th document (by a stable hash of its id) goes to valid.
"""

import argparse
import hashlib
import json
import lzma
import re
from pathlib import Path

BOOKS = [  # Project Gutenberg, public domain in the USA
    "11-0.txt",  # Alice's Adventures in Wonderland
    "35-0.txt",  # The Time Machine
    "pg55.txt",  # The Wonderful Wizard of Oz
    "43-0.txt",  # Dr Jekyll and Mr Hyde
    "46-0.txt",  # A Christmas Carol
    "16-0.txt",  # Peter Pan
    "244-0.txt",  # A Study in Scarlet
    "pg5200.txt",  # Metamorphosis
]
DOC_TARGET_CHARS = {"en": 6000, "zh": 3000}
BUDGET_BYTES = {"en": 1_600_000, "zh": 1_600_000, "code": 1_000_000}
VALID_EVERY = 12


def strip_gutenberg(text: str) -> str:
    """Keep only the book between the PG '*** START' and '*** END' markers."""
    start = re.search(r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG[^\n]*\n", text)
    end = re.search(r"\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", text)
    if not (start and end):
        raise ValueError("Project Gutenberg markers not found")
    return text[start.end() : end.start()].strip()


def chunk_paragraphs(text: str, target_chars: int) -> list[str]:
    """Split on blank lines and greedily pack paragraphs into ~target_chars documents."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    docs, current = [], []
    for p in paragraphs:
        current.append(p)
        if sum(len(x) for x in current) >= target_chars:
            docs.append("\n\n".join(current))
            current = []
    if current:
        docs.append("\n\n".join(current))
    return docs


def english(shared: Path):
    for name in BOOKS:
        raw = (shared / "en_gutenberg_books/texts" / name).read_text(encoding="utf-8-sig")
        book = strip_gutenberg(raw.replace("\r\n", "\n"))
        for i, doc in enumerate(chunk_paragraphs(book, DOC_TARGET_CHARS["en"])):
            yield f"gutenberg/{name}#{i}", "en_gutenberg_books", doc


def chinese(shared: Path):
    """Alternate PRC laws (public domain by Art. 5 PRC Copyright Law) and CMRC 2018 contexts (CC BY-SA 4.0)."""
    laws = []
    with lzma.open(shared / "zh_laws/zh_laws.jsonl.xz", "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            text = rec["text"].replace("<!-- INFO END -->", "").strip()
            text = re.sub(r"\n{3,}", "\n\n", text)
            for i, doc in enumerate(chunk_paragraphs(text, DOC_TARGET_CHARS["zh"])[:2]):
                laws.append((f"zh_laws/{rec['path']}#{i}", "zh_laws", doc))
    passages = []
    for split in ("cmrc2018_dev.json", "cmrc2018_trial.json"):
        data = json.loads((shared / "cmrc2018" / split).read_text(encoding="utf-8"))
        for article in data["data"]:
            ctx = "\n\n".join(p["context"].strip() for p in article["paragraphs"])
            passages.append((f"cmrc2018/{split}/{article['title']}", "cmrc2018", ctx))
    # Interleave so that the budget takes both sources.
    for pair in zip(laws, passages):
        yield from pair


def code(shared: Path):
    with lzma.open(shared / "code_python_thealgorithms/python_files.jsonl.xz", "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if len(rec["content"].strip()) >= 200:
                yield f"thealgorithms/{rec['path']}", "code_python_thealgorithms", rec["content"]


def write_domain(out: Path, domain: str, docs) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    seen, used = set(), 0
    counts = {"train": 0, "valid": 0}
    with open(out / "train.jsonl", "w", encoding="utf-8") as train, open(out / "valid.jsonl", "w", encoding="utf-8") as valid:
        for doc_id, source, text in docs:
            if doc_id in seen or text in seen:
                continue
            seen.update((doc_id, text))
            split = "valid" if int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % VALID_EVERY == 0 else "train"
            line = json.dumps({"id": doc_id, "source": source, "text": text}, ensure_ascii=False) + "\n"
            (valid if split == "valid" else train).write(line)
            counts[split] += 1
            used += len(line.encode())
            if used >= BUDGET_BYTES[domain]:
                break
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("data/default"))
    args = ap.parse_args()
    for domain, docs in (("en", english(args.shared)), ("zh", chinese(args.shared)), ("code", code(args.shared))):
        print(domain, write_domain(args.out / domain, domain, docs))


if __name__ == "__main__":
    main()
