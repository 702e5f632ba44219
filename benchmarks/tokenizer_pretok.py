"""Bytes per token of every pre-tokenizer choice, on held-out English, Chinese and Python.

Two settings, each training one tokenizer per choice through openmill's own `train_tokenizer`:

  small  vocab 8192 on the embedded corpus (data/default train, recipes/tiny.yaml mixture)
  large  vocab 32768 on more of ../shared/data: 68 further Gutenberg books, all PRC laws,
         CMRC 2018 Wikipedia contexts + C3 train/dev passages (modern Chinese prose), TheAlgorithms
         Python; every document of the held-out sets below is left out of it.

Held-out text, the same for both (never trained on by any tokenizer):
  en       data/default/en/valid     Gutenberg prose
  zh-law   data/default/zh/valid     PRC laws (zh_laws source)
  zh-wiki  data/default/zh/valid     Chinese Wikipedia paragraphs (cmrc2018 source)
  zh-c3    ../shared/data/c3 c3-m-test passages: mixed-genre modern Chinese (exam reading texts)
  code     data/default/code/valid   Python

    .venv/bin/python benchmarks/tokenizer_pretok.py [--settings small large] [--pretok NAME ...]

Prints a Markdown table (bytes per token, higher is better) and writes --work/results.json.
Recorded results: benchmarks/tokenizer.md.
"""

from __future__ import annotations

import argparse
import json
import lzma
import platform
import re
import time
from datetime import date
from pathlib import Path

from openmill.config import load_recipe
from openmill.pretokenizers import PRETOKENIZERS
from openmill.tokenizer import Tokenizer, bytes_per_token, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "data" / "default"
HELD_OUT = ("en", "zh-law", "zh-wiki", "zh-c3", "code")


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def held_out(shared: Path) -> dict[str, list[str]]:
    zh = jsonl(DEFAULT / "zh" / "valid.jsonl")
    c3 = json.loads((shared / "c3" / "c3-m-test.json").read_text(encoding="utf-8"))
    return {
        "en": [r["text"] for r in jsonl(DEFAULT / "en" / "valid.jsonl")],
        "zh-law": [r["text"] for r in zh if r["source"] == "zh_laws"],
        "zh-wiki": [r["text"] for r in zh if r["source"] == "cmrc2018"],
        "zh-c3": ["\n".join(item[0]) for item in c3],
        "code": [r["text"] for r in jsonl(DEFAULT / "code" / "valid.jsonl")],
    }


# ------------------------------------------------------------------------- the large corpus


def paragraphs_to_docs(text: str, target_chars: int) -> list[str]:
    """Blank-line paragraphs packed into documents of about target_chars."""
    docs, current, size = [], [], 0
    for p in (p.strip() for p in re.split(r"\n\s*\n", text)):
        if p:
            current.append(p)
            size += len(p)
        if size >= target_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        docs.append("\n\n".join(current))
    return docs


def gutenberg_body(raw: str) -> str | None:
    start = re.search(r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG[^\n]*\n", raw)
    end = re.search(r"\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", raw)
    return raw[start.end() : end.start()] if start and end else None


def write_jsonl(path: Path, texts) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            n += len(text.encode("utf-8"))
    return n


def build_large_corpus(shared: Path, out: Path) -> dict[str, int]:
    """Writes out/<domain>/train.jsonl; returns the bytes of each. Held-out documents are excluded."""
    valid_ids = {r["id"] for d in ("en", "zh", "code") for r in jsonl(DEFAULT / d / "valid.jsonl")}
    default_books = {i.split("/")[1].split("#")[0] for i in valid_ids if i.startswith("gutenberg/")}
    valid_laws = {i.split("/", 1)[1].split("#")[0] for i in valid_ids if i.startswith("zh_laws/")}
    valid_wiki = {i for i in valid_ids if i.startswith("cmrc2018/")}
    valid_code = {i.split("/", 1)[1] for i in valid_ids if i.startswith("thealgorithms/")}

    def english():
        for book in sorted((shared / "en_gutenberg_books" / "texts").glob("*.txt")):
            if book.name in default_books:  # the 8 books of the embedded corpus hold the en held-out text
                continue
            body = gutenberg_body(book.read_text(encoding="utf-8-sig", errors="strict").replace("\r\n", "\n"))
            if body:
                yield from paragraphs_to_docs(body, 6000)

    def laws():
        with lzma.open(shared / "zh_laws" / "zh_laws.jsonl.xz", "rt", encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if rec["path"] not in valid_laws:
                    yield from paragraphs_to_docs(rec["text"].replace("<!-- INFO END -->", ""), 3000)

    def general_chinese():
        for split in ("cmrc2018_dev.json", "cmrc2018_trial.json"):
            for article in json.loads((shared / "cmrc2018" / split).read_text(encoding="utf-8"))["data"]:
                if f"cmrc2018/{split}/{article['title']}" not in valid_wiki:
                    yield "\n\n".join(p["context"].strip() for p in article["paragraphs"])
        for name in ("c3-m-train", "c3-m-dev", "c3-d-train", "c3-d-dev"):
            for item in json.loads((shared / "c3" / f"{name}.json").read_text(encoding="utf-8")):
                yield "\n".join(item[0])

    def code():
        with lzma.open(shared / "code_python_thealgorithms" / "python_files.jsonl.xz", "rt", encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if rec["path"] not in valid_code and rec["content"].strip():
                    yield rec["content"]

    parts = {"en": english(), "zh_law": laws(), "zh_general": general_chinese(), "code": code()}
    return {name: write_jsonl(out / name / "train.jsonl", texts) for name, texts in parts.items()}


# ------------------------------------------------------------------------------- settings


def small_recipe(pretok: str, run_dir: Path):
    return load_recipe(
        REPO / "recipes" / "tiny.yaml",
        [f"tokenizer.pretokenizer={pretok}", "tokenizer.vocab_size=8192", f"run_dir={run_dir}"],
    )


def large_recipe(pretok: str, run_dir: Path, corpus: Path, tmp_recipe: Path):
    domains = {
        d: {"train": [str(corpus / d / "train.jsonl")], "valid": [str(DEFAULT / "en" / "valid.jsonl")]}
        for d in ("en", "zh_law", "zh_general", "code")
    }  # valid is unused here: the held-out sets are measured separately
    recipe = {
        "name": "tokenizer-large",
        "run_dir": str(run_dir),
        "stages": ["tokenizer"],
        "data": {"domains": domains},
        "tokenizer": {
            "vocab_size": 32768,
            "pretokenizer": pretok,
            "mixture": {"en": 1.0, "zh_law": 0.5, "zh_general": 0.5, "code": 0.3},
            "max_train_bytes": 24_000_000,
        },
    }
    tmp_recipe.write_text(json.dumps(recipe), encoding="utf-8")  # JSON is YAML
    return load_recipe(tmp_recipe)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=["small", "large"], choices=["small", "large"])
    ap.add_argument("--pretok", nargs="+", default=list(PRETOKENIZERS), choices=list(PRETOKENIZERS))
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=Path("/tmp/openmill-tokenizer-bench"))
    args = ap.parse_args()

    texts = held_out(args.shared)
    print(f"held-out bytes: { {k: sum(len(t.encode()) for t in v) for k, v in texts.items()} }")
    if "large" in args.settings:
        print("large corpus bytes:", build_large_corpus(args.shared, args.work / "corpus"))
    results = []
    for setting in args.settings:
        for pretok in args.pretok:
            run_dir = args.work / setting / pretok
            if setting == "small":
                recipe = small_recipe(pretok, run_dir)
            else:
                recipe = large_recipe(pretok, run_dir, args.work / "corpus", args.work / f"{setting}-{pretok}.yaml")
            started = time.time()
            _, metrics = train_tokenizer(recipe, run_dir)
            tok = Tokenizer.load(run_dir / "tokenizer.json")
            bpt = {k: bytes_per_token(tok, v, max_bytes=10**9)["bytes_per_token"] for k, v in texts.items()}
            row = {
                "setting": setting,
                "pretokenizer": pretok,
                "vocab_size": tok.vocab_size,
                "train_bytes": metrics["train_bytes"],
                "train_seconds": round(time.time() - started, 1),
                "bytes_per_token": bpt,
            }
            results.append(row)
            print(json.dumps(row, ensure_ascii=False), flush=True)

    header = "| setting | vocab | pretokenizer | " + " | ".join(HELD_OUT) + " | train s |"
    print("\n" + header + "\n|" + "---|" * (header.count("|") - 1))
    for r in results:
        cells = " | ".join(f"{r['bytes_per_token'][k]:.3f}" for k in HELD_OUT)
        print(f"| {r['setting']} | {r['vocab_size']} | {r['pretokenizer']} | {cells} | {r['train_seconds']} |")
    meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()} {platform.processor()}".strip()}
    (args.work / "results.json").write_text(
        json.dumps({**meta, "results": results}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


if __name__ == "__main__":
    main()
