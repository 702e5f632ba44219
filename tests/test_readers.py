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
    table = {"id": ["x", "y", "z"], "text": ["one", None, "汉字" * 10], "source": ["wiki", "wiki", "wiki"]}
    pq.write_table(pa.table(table), path)
    recs = list(iter_records(path, max_bytes=40))
    assert recs[0].id == "x" and recs[0].text == "one" and recs[0].origin == "wiki"  # as a jsonl "source" field
    assert recs[1].reason == "missing_text_field" and recs[1].line == 2
    # 20 characters but 60 UTF-8 bytes: the limit counts bytes, as for jsonl lines
    assert recs[2].reason == "too_large" and recs[2].nbytes == 60


def test_lone_surrogate_is_bad_utf8_but_a_pair_is_text(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "half \\ud800 a pair"}\n{"text": "emoji \\ud83d\\ude00"}\n')
    half, emoji = iter_records(path)
    assert half.reason == "bad_utf8" and half.message.startswith(f"{path}:1: field 'text' holds a lone UTF-16")
    assert emoji.text == "emoji \U0001f600"
    with pytest.raises(DataError, match=rf"^{path}:1: "):
        list(read_documents(path))


def _two_frame_zst(raw: bytes) -> bytes:
    half = len(raw) // 2
    return zstandard.ZstdCompressor().compress(raw[:half]) + zstandard.ZstdCompressor().compress(raw[half:])


@pytest.mark.parametrize(
    "suffix,compress",
    [(".jsonl.gz", gzip.compress), (".jsonl.xz", lzma.compress), (".jsonl.zst", _two_frame_zst)],
)
def test_truncated_compressed_file_is_corrupt_not_shorter(tmp_path, suffix, compress):
    raw = _jsonl_bytes({"text": f"document number {i} " * 20} for i in range(3000))
    whole = compress(raw)
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(whole[: len(whole) * 3 // 4])  # the last frame (zst: the second) cut short
    recs = list(iter_records(path))
    assert recs[-1].reason == "corrupt_file" and recs[-1].message.startswith(f"{path}: cannot be read to the end")
    assert all(isinstance(r, Document) for r in recs[:-2])  # the line being read when it broke may be partial
    with pytest.raises(DataError, match=rf"^{path}: cannot be read"):
        list(read_documents(path))
    path.write_bytes(whole)
    assert len(list(read_documents(path))) == 3000


@pytest.mark.parametrize("name,content", [("bad.parquet", b"PAR1 not a parquet file"), ("bad.jsonl.zst", b"junk")])
def test_corrupt_file_names_the_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    (rec,) = iter_records(path)
    assert rec.reason == "corrupt_file" and rec.message.startswith(f"{path}: ")


def test_max_bytes_counts_the_line_without_its_newline(tmp_path):
    line = json.dumps({"text": "x" * 20}).encode()
    for ending in (b"\n", b""):
        path = tmp_path / "d.jsonl"
        path.write_bytes(line + ending)
        assert [type(r) for r in iter_records(path, max_bytes=len(line))] == [Document]
        assert [r.reason for r in iter_records(path, max_bytes=len(line) - 1)] == ["too_large"]


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
