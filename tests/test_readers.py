"""Readers: every format, every kind of bad line, strict and lenient modes, paths, streaming."""

import gzip
import json
import lzma

import pytest
import zstandard

from openmill.data.readers import (
    BadRecord,
    DataError,
    Document,
    check_corpus,
    expand_paths,
    iter_records,
    read_documents,
)

GOOD = [{"id": "a", "text": "first document", "source": "demo"}, {"text": "second document"}]
BAD_LINES = [
    (b"{not json\n", "bad_json"),
    (b'{"text": "caf\xe9"}\n', "bad_utf8"),
    (b"[1, 2]\n", "not_an_object"),
    (b'{"content": "no text field"}\n', "missing_text_field"),
    (b'{"text": "' + b"x" * 5000 + b'"}\n', "too_large"),
]


def _jsonl_bytes(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


@pytest.mark.parametrize(
    "suffix,compress",
    [
        (".jsonl", lambda b: b),
        (".jsonl.gz", gzip.compress),
        (".jsonl.xz", lzma.compress),
        (".jsonl.zst", lambda b: zstandard.ZstdCompressor().compress(b)),
    ],
)
def test_jsonl_formats_and_bad_lines(tmp_path, suffix, compress):
    raw = _jsonl_bytes(GOOD[:1]) + b"".join(line for line, _ in BAD_LINES) + b"\n" + _jsonl_bytes(GOOD[1:])
    path = tmp_path / f"data{suffix}"
    path.write_bytes(compress(raw))
    recs = list(iter_records(path, max_bytes=1000))
    docs = [r for r in recs if isinstance(r, Document)]
    bad = [r for r in recs if isinstance(r, BadRecord)]
    assert [d.text for d in docs] == ["first document", "second document"]
    assert docs[0].id == "a" and docs[0].origin == "demo" and docs[0].line == 1
    assert docs[1].id == f"{path}:8" and docs[1].line == 8  # blank line 7 is skipped, still counted
    assert [(b.reason, b.line) for b in bad] == [(reason, i + 2) for i, (_, reason) in enumerate(BAD_LINES)]
    assert all(b.message.startswith(f"{path}:{b.line}: ") for b in bad)


def test_strict_raises_naming_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(_jsonl_bytes(GOOD) + b"{oops\n")
    with pytest.raises(DataError, match=rf"^{path}:3: not valid JSON"):
        list(read_documents(path))


def test_lenient_skips_and_reports(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"".join(line for line, _ in BAD_LINES) + _jsonl_bytes(GOOD))
    seen = []
    docs = list(read_documents(path, strict=False, on_bad=seen.append, max_bytes=1000))
    assert len(docs) == 2 and [b.reason for b in seen] == [r for _, r in BAD_LINES]


def test_id_field_and_text_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"key": 7, "body": "hello"}) + "\n")
    (doc,) = read_documents(path, text_field="body", id_field="key")
    assert (doc.id, doc.text) == ("7", "hello")


def test_txt_whole_file_and_bom(tmp_path):
    path = tmp_path / "book.txt.gz"
    path.write_bytes(gzip.compress("\ufeffOnce upon a time.\n".encode()))
    (doc,) = read_documents(path)
    assert doc.text == "Once upon a time.\n" and doc.id == str(path)
    bad = tmp_path / "latin.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    assert [r.reason for r in iter_records(bad)] == ["bad_utf8"]


def test_empty_file_is_recorded(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    assert [r.reason for r in iter_records(path)] == ["empty_file"]
    assert list(read_documents(path)) == []


def test_gigantic_line_is_not_held_in_memory(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "' + b"y" * (8 << 20) + b'"}\n')
        f.write(_jsonl_bytes(GOOD[:1]))
    recs = list(iter_records(path, max_bytes=1 << 20))
    assert recs[0].reason == "too_large" and len(recs[0].raw) <= 256
    assert recs[1].text == "first document" and recs[1].line == 2


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": ["x", "y"], "text": ["one", None]}), path)
    recs = list(iter_records(path))
    assert recs[0].id == "x" and recs[0].text == "one"
    assert recs[1].reason == "missing_text_field" and recs[1].line == 2


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown format"):
        list(iter_records(tmp_path / "x.csv"))
    with pytest.raises(DataError, match="file not found"):
        list(iter_records(tmp_path / "nope.jsonl"))


def test_expand_paths_dirs_and_globs(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/1.jsonl", "a/2.jsonl.gz", "a/skip.csv", "b.txt"):
        (tmp_path / name).write_bytes(b"")
    assert expand_paths([tmp_path / "a"]) == [tmp_path / "a/1.jsonl", tmp_path / "a/2.jsonl.gz"]
    assert expand_paths([str(tmp_path / "*.txt"), tmp_path / "b.txt"]) == [tmp_path / "b.txt"]
    with pytest.raises(DataError, match="matches no"):
        expand_paths([str(tmp_path / "*.parquet")])
    with pytest.raises(DataError, match="file not found"):
        expand_paths([tmp_path / "missing.jsonl"])


def test_check_corpus_strict_and_lenient(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(_jsonl_bytes(GOOD) + b"{oops\n")
    with pytest.raises(DataError, match=":3: not valid JSON"):
        check_corpus([path], "text", "data.domains.en.train")
    assert check_corpus([path], "text", "data.domains.en.train", strict=False) == 2
