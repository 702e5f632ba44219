"""Tokenizer: exact round trip on every embedded document, special tokens, byte fallback, the mixture."""

import json
import pickle
import random

import jinja2
import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from openmill.config import PRETOKENIZERS as CONFIG_CHOICES
from openmill.config import load_recipe
from openmill.data.readers import DataError, read_documents
from openmill.pretokenizers import PRETOKENIZERS
from openmill.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer, train_tokenizer, training_texts

from .conftest import DEFAULT_DATA, REPO

TINY = REPO / "recipes" / "tiny.yaml"
SMALL = ["stages=[tokenizer,tokenize]", "tokenizer.vocab_size=1024", "tokenizer.max_train_bytes=600000"]


def recipe(tmp_path, *overrides):
    return load_recipe(TINY, [*SMALL, f"run_dir={tmp_path}", *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    files, metrics = train_tokenizer(recipe(out), out)
    return Tokenizer.load(files[0]), metrics


def embedded_documents():
    for path in sorted(DEFAULT_DATA.glob("*/*.jsonl")):
        yield from read_documents(path)


def test_every_embedded_document_round_trips_and_token_bytes_count_its_bytes(trained):
    tok, _ = trained
    docs = list(embedded_documents())
    assert len(docs) > 900  # en, zh, code; train and valid
    table = tok.token_bytes()
    for doc, ids in zip(docs, tok.encode_batch([d.text for d in docs])):
        assert tok.decode(ids) == doc.text, doc.id
        assert table[ids].sum() == len(doc.text.encode("utf-8")), doc.id
    assert any("\t" in d.text for d in docs) and any("\u3002" in d.text for d in docs)  # tabs and 。 covered


def test_vocabulary_size_and_special_ids_are_as_documented(trained):
    tok, metrics = trained
    assert tok.vocab_size == metrics["vocab_size"] == 1024 and "warning" not in metrics
    assert metrics["special_token_ids"] == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.end_id) == (0, 1, 2, 6)
    assert tok.role_ids == {"system": 3, "user": 4, "assistant": 5}
    table = tok.token_bytes()
    assert table.shape == (1024,) and (table[:7] == 0).all() and (table[7:] >= 1).all()


def test_special_tokens_come_only_from_ids_never_from_text(trained):
    tok, _ = trained
    text = "a <|eos|> b <|user|>"
    ids = tok.encode(text)
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))
    assert tok.decode(ids) == text
    framed = tok.encode("hi", bos=True, eos=True)
    assert framed[0] == tok.bos_id and framed[-1] == tok.eos_id and framed[1:-1] == tok.encode("hi")
    assert tok.decode(framed) == "<|bos|>hi<|eos|>"
    assert tok.encode_batch(["x", "y"], eos=True) == [tok.encode("x", eos=True), tok.encode("y", eos=True)]
    # Still true in another process (DataLoader workers, process pools receive a pickled copy).
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.encode(text) == ids and copy.eos_id == tok.eos_id


def test_byte_fallback_encodes_any_text_exactly(trained):
    tok, _ = trained
    rng = random.Random(0)
    # Random code points from every plane (no surrogates), emoji sequences, rare CJK, controls.
    points = [cp for cp in (rng.randrange(0x110000) for _ in range(3000)) if not 0xD800 <= cp < 0xE000]
    samples = [
        "".join(map(chr, points)),
        "👩\u200d👩\u200d👧 🇨🇳 🏳️\u200d🌈 e\u0301",
        "𠀀𪚥𱍐 龘 䶵 〇",  # CJK extensions B, G and A
        "\x00\x01\x7f\r\n\x0b\x0c\u2028\ufeff\t  \t",
        bytes(range(256)).decode("latin-1"),
    ]
    table = tok.token_bytes()
    for text in samples:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert table[ids].sum() == len(text.encode("utf-8"))
    # Every byte value has its own token: the full byte-level alphabet is in the vocabulary.
    vocab = tok.hf.get_vocab()
    assert all(symbol in vocab for symbol in pre_tokenizers.ByteLevel.alphabet())


def test_mixture_sets_training_bytes_and_sampling_is_seeded(tmp_path):
    texts, available = training_texts(recipe(tmp_path))
    got = {d: sum(len(t.encode()) for t in ts) for d, ts in texts.items()}
    weights = {"en": 1.0, "zh": 1.0, "code": 0.6}  # recipes/tiny.yaml
    for d, w in weights.items():
        assert got[d] == pytest.approx(600_000 * w / 2.6, abs=8)
    assert texts == training_texts(recipe(tmp_path))[0]
    assert texts["en"] != training_texts(recipe(tmp_path, "seed=7"))[0]["en"]
    assert set(available) == set(weights)


def test_scarce_domain_lowers_the_total_to_keep_the_mixture(tmp_path):
    # 20 MB asked, but en has 1.3 MB: every domain is cut to en's amount times its weight.
    texts, available = training_texts(
        recipe(tmp_path, "tokenizer.max_train_bytes=20000000", "tokenizer.mixture={en: 1.0, zh: 1.0, code: 0.5}")
    )
    got = {d: sum(len(t.encode()) for t in ts) for d, ts in texts.items()}
    assert got["en"] == available["en"] < available["zh"]
    assert got["zh"] == pytest.approx(got["en"], abs=4) and got["code"] == pytest.approx(got["en"] / 2, abs=4)


def test_zero_weight_domain_is_not_trained_on_but_is_measured(tmp_path):
    out = tmp_path / "tok"
    _, metrics = train_tokenizer(recipe(tmp_path, "tokenizer.mixture={en: 1.0}", "tokenizer.vocab_size=512"), out)
    assert set(metrics["train_bytes"]) == {"en"}
    assert set(metrics["valid_bytes_per_token"]) == {"en", "zh", "code"}


def test_config_choices_are_the_implemented_pretokenizers():
    assert tuple(PRETOKENIZERS) == CONFIG_CHOICES


@pytest.mark.parametrize("name", list(PRETOKENIZERS))
def test_every_pretokenizer_trains_round_trips_and_is_recognised(tmp_path, name):
    out = tmp_path / "tok"
    train_tokenizer(
        recipe(
            tmp_path, f"tokenizer.pretokenizer={name}", "tokenizer.vocab_size=700", "tokenizer.max_train_bytes=150000"
        ),
        out,
    )
    tok = Tokenizer.load(out / "tokenizer.json")
    text = "第一条 为了保护人民，制定本法。\n\tdef f(x):\n        return x**2 + 12345  # It's done"
    assert tok.decode(tok.encode(text)) == text
    assert tok.pretokenizer == name


def test_cjk_char_split_keeps_chinese_words_out_of_the_vocabulary(tmp_path):
    """With every CJK character its own piece no token holds two; with runs, words become tokens."""

    def multi_char_cjk_tokens(name):
        out = tmp_path / name
        train_tokenizer(recipe(tmp_path, f"tokenizer.pretokenizer={name}", "tokenizer.vocab_size=2000"), out)
        tok = Tokenizer.load(out / "tokenizer.json")
        pieces = (tok.decode([i]) for i in range(len(SPECIAL_TOKENS), tok.vocab_size))
        return {p for p in pieces if sum("\u4e00" <= c <= "\u9fff" for c in p) >= 2}

    assert multi_char_cjk_tokens("cjk_chars") == set()
    assert "人民" in multi_char_cjk_tokens("cjk_runs")


def test_chat_encoding_matches_the_jinja_template_and_masks_replies(trained):
    tok, _ = trained
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "你好！\nWhat is 2+2?"},
        {"role": "assistant", "content": " 4."},
    ]
    ids, train = tok.encode_chat(messages)
    r = tok.role_ids
    assert ids[0] == tok.bos_id and ids.count(tok.end_id) == 3
    assert [i for i in ids if i in r.values()] == [r["system"], r["user"], r["assistant"]]
    reply = ids[ids.index(r["assistant"]) + 1 :]
    assert tok.decode(reply) == " 4.<|end|>"
    assert [i for i, t in zip(ids, train) if t] == reply

    # The template the exports ship renders text that the plain HF tokenizer (specials parsed) encodes the same.
    for generation_prompt in (False, True):
        text = jinja2.Template(CHAT_TEMPLATE).render(
            messages=messages, bos_token="<|bos|>", add_generation_prompt=generation_prompt
        )
        plain = HFTokenizer.from_str(tok.hf.to_str())
        assert plain.encode(text, add_special_tokens=False).ids == tok.encode_chat(messages, generation_prompt)[0]
    assert tok.encode_chat(messages[:2], add_generation_prompt=True)[0][-1] == r["assistant"]
    with pytest.raises(ValueError, match=r"messages\[0\]: expected role"):
        tok.encode_chat([{"role": "robot", "content": "x"}])


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="tokenizer file not found"):
        Tokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=f"{bad}: not a valid tokenizer.json"):
        Tokenizer.load(bad)
    foreign = tmp_path / "foreign.json"
    HFTokenizer(models.BPE(vocab={"a": 0}, merges=[])).save(str(foreign))
    with pytest.raises(DataError, match=r"not an openmill tokenizer \(special tokens missing: <\|bos\|>"):
        Tokenizer.load(foreign)


def test_metrics_report_valid_bytes_per_token_per_domain(trained):
    _, metrics = trained
    bpt = metrics["valid_bytes_per_token"]
    assert set(bpt) == {"en", "zh", "code"} and all(1.0 < v < 8.0 for v in bpt.values())
    assert json.loads(json.dumps(metrics)) == metrics  # goes into manifest.json as is
    assert np.isclose(sum(metrics["train_bytes"].values()), 600_000, atol=10)
