"""Tokenize stage and token shards: exact contents, determinism across workers, resume, reads, dtypes."""

import json
import shutil

import numpy as np
import pytest
from tokenizers import AddedToken, decoders, models
from tokenizers import Tokenizer as HFTokenizer

from openmill.config import load_recipe
from openmill.data import tokenize as tokenize_mod
from openmill.data.readers import DataError, read_documents
from openmill.data.shards import TokenShards, dtype_for_vocab
from openmill.data.sources import document_files
from openmill.data.tokenize import tokenize_corpus
from openmill.pretokenizers import PRETOKENIZERS
from openmill.rundir import sha256_path
from openmill.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

from .conftest import DEFAULT_DATA, REPO

TINY = REPO / "recipes" / "tiny.yaml"
# Small shards so that every split has several.
SMALL = ["stages=[tokenizer,tokenize]", "tokenizer.vocab_size=1024", "tokenizer.max_train_bytes=300000", "tokenize.docs_per_shard=10"]


def recipe(tmp_path, *overrides):
    return load_recipe(TINY, [*SMALL, f"run_dir={tmp_path}", *overrides])


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    return train_tokenizer(recipe(out), out)[0][0]


@pytest.fixture(scope="module")
def sliced(tmp_path_factory):
    """--set overrides for a slice of the embedded corpus (40 train, 15 valid documents per domain)."""
    root = tmp_path_factory.mktemp("slice")
    domains = {}
    for domain in ("en", "zh", "code"):
        for split, n in (("train", 40), ("valid", 15)):
            lines = (DEFAULT_DATA / domain / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
            (root / f"{domain}-{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        domains[domain] = {s: [str(root / f"{domain}-{s}.jsonl")] for s in ("train", "valid")}
    return [f"data.domains={json.dumps(domains)}"]


@pytest.fixture(scope="module")
def sliced_reference(tmp_path_factory, tokenizer_path, sliced):
    out = tmp_path_factory.mktemp("sliced-tokens")
    tokenize_corpus(recipe(out, "tokenize.workers=1", *sliced), tokenizer_path, out)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer_path):
    """The whole embedded corpus, one worker: (recipe, out_dir, metrics)."""
    out = tmp_path_factory.mktemp("tokens")
    r = recipe(out, "tokenize.workers=1", "tokenize.docs_per_shard=50")
    _, metrics = tokenize_corpus(r, tokenizer_path, out)
    return r, out, metrics


def source_texts(r, domain, split):
    files, field = document_files(r, domain, split)
    return [d.text for path in files for d in read_documents(path, field)]


def test_shards_decode_back_to_every_document_each_followed_by_eos(reference, tokenizer_path):
    r, out, metrics = reference
    tok = Tokenizer.load(tokenizer_path)
    for domain in ("en", "zh", "code"):
        for split in ("train", "valid"):
            shards = TokenShards(out / domain / split)
            texts = source_texts(r, domain, split)
            ends = shards.doc_ends()
            assert len(ends) == len(texts) == shards.n_docs and ends[-1] == shards.n_tokens
            tokens = shards.read(0, shards.n_tokens)
            starts = np.concatenate([[0], ends[:-1]])
            for text, a, b in zip(texts, starts, ends):
                assert tokens[b - 1] == tok.eos_id and tok.eos_id not in tokens[a : b - 1]
                assert tok.decode(tokens[a : b - 1].tolist()) == text
            index = json.loads((out / domain / split / "index.json").read_text())
            assert index["dtype"] == "uint16" and len(index["shards"]) == -(-len(texts) // 50)
            assert index["bytes"] == sum(len(t.encode()) for t in texts) == shards.n_bytes
            m = metrics["domains"][domain][split]
            assert (m["tokens"], m["docs"], m["bytes"]) == (index["tokens"], index["docs"], index["bytes"])
            assert m["bytes_per_token"] == pytest.approx(m["bytes"] / (m["tokens"] - m["docs"]), abs=1e-4)


def test_same_bytes_whatever_the_worker_count(sliced_reference, tokenizer_path, sliced, tmp_path):
    parallel = tmp_path / "tokens"
    tokenize_corpus(recipe(tmp_path, "tokenize.workers=2", *sliced), tokenizer_path, parallel)
    for domain in ("en", "zh", "code"):
        assert sha256_path(parallel / domain) == sha256_path(sliced_reference / domain), domain


def test_crash_costs_only_unfinished_shards_and_resume_gives_the_same_bytes(
    sliced_reference, tokenizer_path, sliced, tmp_path, monkeypatch
):
    r = recipe(tmp_path, "tokenize.workers=1", *sliced)
    real = tokenize_mod._write_shard
    written = []

    def crash_after_five(job):
        if len(written) == 5:
            raise KeyboardInterrupt("simulated crash")
        written.append(job.index)
        return real(job)

    monkeypatch.setattr(tokenize_mod, "_write_shard", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(r, tokenizer_path, tmp_path / "tokens")
    assert not (tmp_path / "tokens" / "en" / "train" / "index.json").exists()  # incomplete = unreadable

    resumed = []
    monkeypatch.setattr(tokenize_mod, "_write_shard", lambda job: resumed.append(job.index) or real(job))
    _, metrics = tokenize_corpus(r, tokenizer_path, tmp_path / "tokens")
    total_shards = sum(v["shards"] for d in metrics["domains"].values() for v in d.values())
    assert total_shards == 18 and len(resumed) == total_shards - 5
    assert sum(v["resumed_shards"] for d in metrics["domains"].values() for v in d.values()) == 5
    for domain in ("en", "zh", "code"):
        assert sha256_path(tmp_path / "tokens" / domain) == sha256_path(sliced_reference / domain)


def test_damaged_or_changed_shards_are_redone_and_stale_ones_removed(
    sliced_reference, tokenizer_path, sliced, tmp_path, monkeypatch
):
    work = tmp_path / "tokens"
    shutil.copytree(sliced_reference, work)
    folder = work / "zh" / "valid"
    (folder / "shard_00001.bin").write_bytes(b"\0\0")  # truncated data under a valid marker
    redone = []
    real = tokenize_mod._write_shard
    monkeypatch.setattr(tokenize_mod, "_write_shard", lambda job: redone.append((job.folder, job.index)) or real(job))
    tokenize_corpus(recipe(tmp_path, "tokenize.workers=1", *sliced), tokenizer_path, work)
    assert redone == [(folder, 1)]
    assert sha256_path(folder) == sha256_path(sliced_reference / "zh" / "valid")

    # Bigger shards: every shard's text changes, so all are redone, and the old higher shards go away.
    tokenize_corpus(
        recipe(tmp_path, "tokenize.workers=1", "tokenize.docs_per_shard=1000", *sliced), tokenizer_path, work
    )
    assert sorted(p.name for p in folder.iterdir()) == [
        "index.json", "shard_00000.bin", "shard_00000.done.json", "shard_00000.idx.npy"
    ]  # fmt: skip
    assert TokenShards(folder).n_tokens == TokenShards(sliced_reference / "zh" / "valid").n_tokens


def test_max_shard_bytes_closes_shards_early(tokenizer_path, sliced, tmp_path):
    limits = ["tokenize.workers=1", "tokenize.docs_per_shard=1000", "tokenize.max_shard_bytes=20000"]
    r = recipe(tmp_path, *limits, *sliced)
    tokenize_corpus(r, tokenizer_path, tmp_path / "tokens")
    index = json.loads((tmp_path / "tokens" / "en" / "valid" / "index.json").read_text())
    largest_doc = max(len(t.encode()) for t in source_texts(r, "en", "valid"))
    assert len(index["shards"]) > 3
    assert all(s["bytes"] < 20000 + largest_doc for s in index["shards"])


def test_read_crosses_shard_boundaries_and_checks_bounds(reference):
    _, out, _ = reference
    shards = TokenShards(out / "code" / "train")
    flat = np.concatenate([np.fromfile(out / "code" / "train" / s["file"], dtype=np.uint16) for s in shards.shards])
    assert len(shards.shards) > 3 and len(flat) == shards.n_tokens == len(shards)
    rng = np.random.default_rng(0)
    boundaries = shards.starts[1:-1]
    cases = [(int(b) - 5, 10) for b in boundaries] + [
        (0, shards.n_tokens),
        (int(boundaries[0]) - 1, int(boundaries[2]) - int(boundaries[0]) + 2),
    ]
    cases += [(int(s), int(n)) for s, n in zip(rng.integers(0, shards.n_tokens - 3000, 50), rng.integers(0, 3000, 50))]
    for start, length in cases:
        got = shards.read(start, length)
        assert got.dtype == np.int64 and np.array_equal(got, flat[start : start + length])
    for start, length in ((-1, 2), (shards.n_tokens - 1, 2), (0, shards.n_tokens + 1)):
        with pytest.raises(IndexError):
            shards.read(start, length)


def test_open_fails_clearly_on_missing_index_or_truncated_shard(reference, tmp_path):
    _, out, _ = reference
    with pytest.raises(DataError, match="index.json: not found"):
        TokenShards(tmp_path)
    shutil.copytree(out / "en" / "valid", tmp_path / "v")
    data = tmp_path / "v" / "shard_00000.bin"
    data.write_bytes(data.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"shard_00000.bin: expected \d+ bytes"):
        TokenShards(tmp_path / "v")


def test_dtype_follows_the_vocabulary_size(tmp_path):
    assert dtype_for_vocab(8192) == np.uint16 and dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.uint32 and dtype_for_vocab(100_000) == np.uint32

    # A real tokenizer.json over 65,536 ids (specials, bytes and unused filler tokens, no merges):
    # ids beyond uint16 exist, so the shards must be uint32, and a high id survives the round trip.
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *sorted(alphabet)])}
    vocab.update({f"filler{i}": len(vocab) + i for i in range(70_000 - len(vocab))})
    vocab["Ġhello"] = 70_000  # reachable only through the merges below
    merges = [("Ġ", "h"), ("Ġh", "e"), ("Ġhe", "l"), ("Ġhel", "l"), ("Ġhell", "o")]
    vocab.update({"Ġh": 70_001, "Ġhe": 70_002, "Ġhel": 70_003, "Ġhell": 70_004})
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = PRETOKENIZERS["cl100k"].build()
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    path = tmp_path / "big.json"
    hf.save(str(path))

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "say hello"}) + "\n" + json.dumps({"text": ""}) + "\n")
    domains = f"data.domains={{t: {{train: [{data}], valid: [{data}]}}}}"
    r = load_recipe(
        TINY, ["stages=[tokenize]", domains, "tokenizer.mixture={}", "pretrain.mixture={}", "pretrain.phases=[]", "tokenize.workers=1", f"run_dir={tmp_path}"]
    )
    _, metrics = tokenize_corpus(r, path, tmp_path / "tokens")
    shards = TokenShards(tmp_path / "tokens" / "t" / "train")
    assert metrics["dtype"] == "uint32" and shards.dtype == np.uint32
    ids = shards.read(0, shards.n_tokens).tolist()
    assert 70_000 in ids and ids[-2:] == [1, 1]  # the empty document stays, as a lone EOS
    assert Tokenizer.load(path).decode(ids[:-2]) == "say hello"
