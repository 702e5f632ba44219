"""The curate stage end to end: planted defects counted exactly, bad input, strict mode, resume after a kill.

Real text: the embedded demo corpus (always) and ../shared/data (books, laws, CMRC, code; skipped
when absent). Each run uses a few dozen documents so the file stays well under a minute.
"""

import gzip
import json
import lzma
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openmill.config import Recipe
from openmill.data.curate.doc import DocView
from openmill.data.curate.minhash import jaccard, shingles
from openmill.data.curate.stage import run_curate
from openmill.data.curate.text import TOKEN_RE
from openmill.data.readers import DataError, read_documents

from .conftest import DEFAULT_DATA, SHARED

# Near-duplicates with 5-20% of words changed have word-bigram Jaccard >= ~0.37 (benchmarks/curate.md
# measures it), unrelated documents < 0.2: this dedup setting separates them. The defaults
# (5-grams at 0.8, SlimPajama-like) deliberately catch only much closer copies.
PLANTED_DEDUP = {"shingle_words": 2, "shingle_cjk_chars": 2, "threshold": 0.3, "num_perm": 128, "bands": 64, "rows": 2}
CHANGE_FRACTIONS = (0.05, 0.10, 0.15, 0.20)


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def write_jsonl(path: Path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return path


def recipe_for(tmp_path, files: dict, **curate) -> Recipe:
    domains = {d: {"train": f["train"], "valid": f["valid"]} for d, f in files.items()}
    curate = {"workers": 1, "plots": False, **curate}
    return Recipe.model_validate(
        {"name": "t", "run_dir": str(tmp_path / "run"), "data": {"domains": domains}, "curate": curate}
    )


def curated(out: Path, domain: str, split: str) -> list[dict]:
    return [
        json.loads(line) for p in sorted((out / domain / split).glob("part-*.jsonl.gz")) for line in gzip.open(p, "rt")
    ]


def rejects(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((out / "rejects").rglob("*.jsonl.gz")) for line in gzip.open(p, "rt")]


def dropped(metrics: dict, domain: str) -> dict:
    """{(filter, reason): n} of one domain, from the report."""
    d = metrics["by_domain"][domain]
    steps = [("reader", d["reader"]), *d["filters"].items(), ("dedup", d["dedup"])]
    return {(f, r): n for f, s in steps for r, n in s["dropped"].items()}


# ------------------------------------------------------------------------------------ planting


def change_words(text: str, fraction: float, vocab: list[str], rng: random.Random) -> str:
    """Replace `fraction` of the tokens (words; characters in Chinese) by tokens drawn from `vocab`."""
    toks = list(TOKEN_RE.finditer(text))
    picked = sorted(rng.sample(range(len(toks)), round(fraction * len(toks))))
    out, last = [], 0
    for i in picked:
        m = toks[i]
        out += [text[last : m.start()], rng.choice(vocab)]
        last = m.end()
    return "".join(out + [text[last:]])


def distinct(texts: list[str], limit: float = 0.2) -> list[str]:
    """Greedy subset whose pairwise Jaccard (planted shingling) stays below `limit`."""
    keep, shs = [], []
    for t in texts:
        s = shingles(DocView(t), PLANTED_DEDUP["shingle_words"], PLANTED_DEDUP["shingle_cjk_chars"])
        if all(jaccard(s, o) < limit for o in shs):
            keep.append(t)
            shs.append(s)
    return keep


BOILERPLATE = {
    "en": "\n".join(
        f"• {x}"
        for x in [
            "Home page of the society and its news",
            "About us and the history of the group",
            "Contact the office by post or by phone",
            "Read the terms of use of this site",
            "Read our privacy policy and cookie policy",
            "Join the mailing list for the newsletter",
            "Sign in to your account with your name",
            "Browse the archive of the past issues",
            "Find the events calendar for this year",
            "Support the work of the society today",
            "Share this page with your friends",
            "Back to the top of the page",
        ]
    ),
    "zh": "\n".join(
        f"• {x}"
        for x in [
            "网站首页和最新的新闻动态",
            "关于我们以及协会的发展历史",
            "通过邮件或者电话联系我们的办公室",
            "阅读本网站的使用条款和隐私政策",
            "订阅我们每周发送的电子通讯",
            "登录你的账户并修改个人资料",
            "浏览过去各期杂志的全部文章",
            "查看今年所有活动的详细日程",
            "把这个页面分享给你的朋友们",
            "返回本页面的顶部",
        ]
    ),
}
SHORT = {"en": "Thanks for reading!", "zh": "谢谢阅读！"}
REPEATED_LINE = {"en": "Click here to subscribe to our weekly newsletter.", "zh": "点击这里订阅我们的每周电子通讯。"}


def plant(base: dict[str, list[str]], other_language: dict[str, str], seed: int = 0):
    """Train/valid records per domain with known defects; returns (records, expected drops per domain)."""
    rng = random.Random(seed)
    records, expected = {}, {}
    for lang in ("en", "zh"):
        docs = base[lang]
        vocab = [t for d in docs for t in TOKEN_RE.findall(d)]
        extra = [docs[0]]  # exact copy
        extra += [change_words(docs[1 + i], f, vocab, rng) for i, f in enumerate(CHANGE_FRACTIONS)]
        extra.append(BOILERPLATE[lang])
        lines = [line for line in docs[5].split("\n") if line.strip()][:10]
        extra.append("\n".join(lines + [REPEATED_LINE[lang]] * 10))
        extra.append(other_language[lang])
        extra.append(SHORT[lang])
        records[lang] = {
            "train": [
                [{"id": f"{lang}-base-{i}", "text": t} for i, t in enumerate(docs[:-1])],
                [{"id": f"{lang}-planted-{i}", "text": t} for i, t in enumerate(extra)],
            ],
            "valid": [[{"id": f"{lang}-valid-copy", "text": docs[6]}, {"id": f"{lang}-valid-own", "text": docs[-1]}]],
        }
        expected[lang] = {
            ("dedup", "exact_duplicate"): 1,
            ("dedup", "near_duplicate"): len(CHANGE_FRACTIONS),
            ("dedup", "valid_duplicates_train"): 1,
            ("quality", "bullet_lines_fraction_above_max"): 1,
            ("repetition", "duplicate_lines_fraction_above_max"): 1,
            ("language", "wrong_language"): 1,
            ("length", "chars_below_min"): 1,
        }
    code = base["code"]
    records["code"] = {
        "train": [
            [{"id": f"code-{i}", "text": t} for i, t in enumerate(code[:-1])],
            [
                {"id": "code-copy", "text": code[0]},
                {"id": "code-gen", "text": "# Code generated by a tool. DO NOT EDIT.\n" + code[1]},
            ],
        ],
        "valid": [[{"id": "code-valid", "text": code[-1]}]],
    }
    expected["code"] = {("dedup", "exact_duplicate"): 1, ("code", "autogenerated"): 1}
    return records, expected


def write_records(tmp_path: Path, records) -> dict:
    files = {}
    for d, splits in records.items():
        files[d] = {
            s: [write_jsonl(tmp_path / "in" / d / f"{s}{i}.jsonl", recs) for i, recs in enumerate(parts)]
            for s, parts in splits.items()
        }
        files[d]["valid"] = files[d]["valid"][:1] + files[d]["valid"][1:]
    return files


def kept_base(tmp_path: Path, base: dict[str, list[str]]) -> dict[str, list[str]]:
    """The base documents that survive the stage on their own, pairwise distinct."""
    files = {
        d: {
            "train": [
                write_jsonl(tmp_path / "base" / f"{d}.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(docs)])
            ],
            "valid": [write_jsonl(tmp_path / "base" / f"{d}.v.jsonl", [{"text": docs[0]}])],
        }
        for d, docs in base.items()
    }
    r = recipe_for(tmp_path / "base", files, dedup=PLANTED_DEDUP)
    run_curate(r, r.root / "curate")
    return {d: distinct([x["text"] for x in curated(r.root / "curate", d, "train")]) for d in base}


def check_planted(tmp_path, base, other_language):
    base = kept_base(tmp_path, base)
    assert min(len(base["en"]), len(base["zh"])) >= 9 and len(base["code"]) >= 3, {d: len(v) for d, v in base.items()}
    records, expected = plant(base, other_language)
    files = write_records(tmp_path, records)
    r = recipe_for(tmp_path, files, dedup=PLANTED_DEDUP, docs_per_shard=4)  # small shards: duplicates cross shards
    out = r.root / "curate"
    _, metrics = run_curate(r, out)
    for d in ("en", "zh", "code"):
        assert dropped(metrics, d) == expected[d], d
        n_in = sum(len(p) for s in records[d].values() for p in s)
        assert metrics["by_domain"][d]["docs_in"] == n_in
        assert metrics["by_domain"][d]["docs_out"] == n_in - sum(expected[d].values())
    rej = rejects(out)
    assert len(rej) == sum(sum(e.values()) for e in expected.values())
    assert all(x["file"].endswith(".jsonl") and x["line"] >= 1 and x["filter"] and x["reason"] for x in rej)
    near = [x for x in rej if x["reason"] == "near_duplicate"]
    assert sorted(x["id"] for x in near) == [f"{lang}-planted-{i}" for lang in ("en", "zh") for i in range(1, 5)]
    assert {x["duplicate_of"] for x in near} == {f"{lang}-base-{i}" for lang in ("en", "zh") for i in range(1, 5)}


def test_planted_defects_on_demo_corpus(tmp_path):
    base = {d: [x["text"] for x in read_jsonl(DEFAULT_DATA / d / "train.jsonl")[:40:2]] for d in ("en", "zh")}
    base["en"] = base["en"][:14]
    base["zh"] = [t for t in base["zh"] if len(t) > 600][:14]
    base["code"] = [x["text"] for x in read_jsonl(DEFAULT_DATA / "code" / "train.jsonl")[:6]]
    check_planted(tmp_path, base, {"en": base["zh"][-1], "zh": base["en"][-1]})


def _shared_base():
    books = sorted((SHARED / "en_gutenberg_books" / "texts").glob("*.txt"))[10:24]
    en = []
    for b in books:
        text = b.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        paras = [p for p in text.split("\n\n") if len(p) > 200]
        en.append("\n\n".join(paras[len(paras) // 2 : len(paras) // 2 + 6]))  # mid-book: no licence boilerplate
    with lzma.open(SHARED / "zh_laws" / "zh_laws.jsonl.xz", "rt", encoding="utf-8") as f:
        laws = [json.loads(line)["text"][:2500] for _, line in zip(range(400), f)][::40]
    cmrc = json.loads((SHARED / "cmrc2018" / "cmrc2018_trial.json").read_text(encoding="utf-8"))["data"]
    zh = [
        t for pair in zip(laws, ("\n\n".join(p["context"] for p in a["paragraphs"]) for a in cmrc[::25])) for t in pair
    ]
    with lzma.open(SHARED / "code_python_thealgorithms" / "python_files.jsonl.xz", "rt", encoding="utf-8") as f:
        code = [json.loads(line)["content"] for _, line in zip(range(200), f)][::40]
    return {"en": en, "zh": [t for t in zh if len(t) > 400][:14], "code": code}


@pytest.mark.skipif(not (SHARED / "zh_laws").is_dir(), reason="../shared/data not present")
def test_planted_defects_on_shared_real_data(tmp_path):
    base = _shared_base()
    check_planted(tmp_path, base, {"en": base["zh"][-1], "zh": base["en"][-1]})


# ------------------------------------------------------------------------------ demo, outputs


def test_demo_corpus_mostly_kept_and_layout(tmp_path):
    files = {d: {s: [DEFAULT_DATA / d / f"{s}.jsonl"] for s in ("train", "valid")} for d in ("en", "zh", "code")}
    r = recipe_for(tmp_path, files, plots=True, workers=2)
    out = r.root / "curate"
    outputs, metrics = run_curate(r, out)
    for d in ("en", "zh", "code"):
        m = metrics["by_domain"][d]
        assert m["docs_out"] >= 0.9 * m["docs_in"], (d, dropped(metrics, d))
        train = curated(out, d, "train")
        assert train and set(train[0]) == {"id", "source", "text"}
        docs = list(read_documents(out / d / "train" / "part-00000.jsonl.gz"))  # what the tokenize stage reads
        assert docs[0].text == train[0]["text"]
    assert {p.name for p in outputs} >= {"en", "zh", "code", "rejects", "report.json", "report.md", "plots"}
    assert all(out in p.parents for p in outputs)
    assert (out / "plots" / "zh.png").stat().st_size > 10_000
    assert not (out / "work").exists()
    assert json.loads((out / "report.json").read_text())["docs_out"] == metrics["docs_out"]
    assert "| zh | repetition |" in (out / "report.md").read_text()


# ---------------------------------------------------------------------------------- bad input


def test_bad_input_is_counted_and_rejected_with_file_and_line(tmp_path):
    good = read_jsonl(DEFAULT_DATA / "en" / "train.jsonl")[:3]
    train = tmp_path / "train.jsonl"
    with open(train, "wb") as f:
        f.write(json.dumps(good[0]).encode() + b"\n")
        f.write(b'{"text": "broken\n')  # 2: malformed JSON
        f.write(b'{"text": "caf\xe9 au lait"}\n')  # 3: invalid UTF-8
        f.write(b'{"body": "no text field"}\n')  # 4: missing field
        f.write(b'{"text": "' + b"gigantic " * 300_000 + b'"}\n')  # 5: 2.7 MB line
        f.write(json.dumps(good[1]).encode() + b"\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    files = {"en": {"train": [train, empty], "valid": [write_jsonl(tmp_path / "v.jsonl", good[2:])]}}
    r = recipe_for(tmp_path, files, max_record_bytes=1 << 20)
    out = r.root / "curate"
    _, metrics = run_curate(r, out)
    assert dropped(metrics, "en") == {
        ("reader", "bad_json"): 1,
        ("reader", "bad_utf8"): 1,
        ("reader", "missing_text_field"): 1,
        ("reader", "too_large"): 1,
        ("reader", "empty_file"): 1,
    }
    got = sorted((Path(x["file"]).name, x["line"], x["reason"]) for x in rejects(out))
    assert got == [
        ("empty.jsonl", 0, "empty_file"),
        ("train.jsonl", 2, "bad_json"),
        ("train.jsonl", 3, "bad_utf8"),
        ("train.jsonl", 4, "missing_text_field"),
        ("train.jsonl", 5, "too_large"),
    ]
    assert [x["id"] for x in curated(out, "en", "train")] == [good[0]["id"], good[1]["id"]]
    reader = metrics["by_domain"]["en"]["reader"]
    assert reader["bytes_in"] - reader["bytes_out"] > 2_700_000  # the gigantic line is counted, not held

    strict = recipe_for(tmp_path / "strict", files, strict=True)
    with pytest.raises(DataError, match=rf"^{re.escape(str(train))}:2: not valid JSON"):
        run_curate(strict, strict.root / "curate")


# ------------------------------------------------------------------------- determinism, resume


def _outputs_bytes(out: Path) -> dict:
    files = (p for p in sorted(out.rglob("*.jsonl.gz")) if "work" not in p.relative_to(out).parts)
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


RUNNER = """
import sys
from openmill.config import Recipe
from openmill.data.curate.stage import run_curate
import json
if __name__ == "__main__":
    r = Recipe.model_validate(json.loads(open(sys.argv[1]).read()))
    run_curate(r, r.root / "curate")
"""


def test_killed_run_resumes_to_the_same_output(tmp_path):
    files = {d: {s: [DEFAULT_DATA / d / f"{s}.jsonl"] for s in ("train", "valid")} for d in ("en", "zh")}
    whole = recipe_for(tmp_path / "whole", files, docs_per_shard=40)
    run_curate(whole, whole.root / "curate")
    expected = _outputs_bytes(whole.root / "curate")

    killed = recipe_for(tmp_path / "killed", files, docs_per_shard=40, workers=2)
    spec = tmp_path / "recipe.json"
    spec.write_text(killed.model_dump_json())
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(spec)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    work = killed.root / "curate" / "work" / "filter"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(work.rglob("*.stats.json"))) < 3 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the stage and its worker processes
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in work.rglob("*.stats.json")}
    assert len(finished) >= 3, "the run finished or failed before it could be killed"
    # resume with another worker count (not part of the work's key) and keep work/ to inspect it
    resumed = killed.model_copy(update={"curate": killed.curate.model_copy(update={"workers": 1, "keep_work": True})})
    stray = killed.root / "curate" / "en" / "train" / ".part-00009.jsonl.gz.tmp-99999"  # as a kill mid-write leaves
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"half")
    run_curate(resumed, killed.root / "curate")
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())  # finished chunks were not redone
    assert _outputs_bytes(killed.root / "curate") == expected
    assert not list((killed.root / "curate").rglob(".*.tmp-*"))


def test_formats_directories_globs_ids_and_pii_through_the_stage(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    en = [x["text"] for x in read_jsonl(DEFAULT_DATA / "en" / "train.jsonl")[:4]]
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(json.dumps({"key": "z1", "body": en[0]}).encode() + b"\n")
    )
    pq.write_table(
        pa.table({"key": ["p1"], "body": [en[1] + "\nWrite to jane@example.org or 10.0.0.1."]}), raw / "b.parquet"
    )
    (tmp_path / "c.jsonl").write_text(json.dumps({"key": "c1", "body": en[2]}) + "\n")
    (tmp_path / "valid.jsonl").write_text(json.dumps({"key": "v1", "body": en[3]}) + "\n")
    r = Recipe.model_validate(
        {
            "name": "t",
            "run_dir": str(tmp_path / "run"),
            "data": {
                "domains": {
                    "web": {
                        "train": [str(raw), str(tmp_path / "c.*")],
                        "valid": [str(tmp_path / "valid.jsonl")],
                        "text_field": "body",
                    }
                }
            },
            "curate": {"workers": 1, "plots": False, "languages": ["en"], "id_field": "key", "pii": {"enabled": True}},
        }
    )
    _, metrics = run_curate(r, r.root / "curate")
    docs = curated(r.root / "curate", "web", "train")
    assert [d["id"] for d in docs] == ["z1", "p1", "c1"]
    assert "<EMAIL>" in docs[1]["text"] and "<IP>" in docs[1]["text"] and "jane@" not in docs[1]["text"]
    assert metrics["by_domain"]["web"]["pii_masked"] == {"emails": 1, "ip_addresses": 1, "phone_numbers": 0}
    assert [d["id"] for d in curated(r.root / "curate", "web", "valid")] == ["v1"]


def test_reserved_domain_name_is_refused(tmp_path):
    files = {"rejects": {s: [DEFAULT_DATA / "en" / f"{s}.jsonl"] for s in ("train", "valid")}}
    r = recipe_for(tmp_path, files)
    with pytest.raises(ValueError, match="data.domains.rejects: reserved"):
        run_curate(r, r.root / "curate")
