"""The tokenizer: byte-level BPE trained with HF `tokenizers`, its special tokens and chat format.

Vocabulary layout (ids): the special tokens first, in SPECIAL_TOKENS order (<|bos|> = 0 ...), then
the 256 byte symbols, then the learned merges. Every byte is a symbol, so any text, emoji or
invalid-looking rare character included, encodes without an unknown token, and decode(encode(text))
gives back `text` exactly (no normalisation, no added prefix space).

Special tokens are never produced from text: a document that contains the characters "<|eos|>" is
encoded as ordinary bytes. Specials enter a sequence only as ids (encode's bos/eos, encode_chat).

Chat format (one turn per message, no newline added anywhere, so content is kept byte for byte):

    <|bos|><|system|>{system}<|end|><|user|>{user}<|end|><|assistant|>{reply}<|end|>...

A reply is generated after `<|assistant|>` and stops at `<|end|>`. CHAT_TEMPLATE renders the same
text in Jinja for the Hugging Face and GGUF exports (tested to give the same ids as encode_chat).
"""

from __future__ import annotations

import heapq
import itertools
import json
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from openmill.config import Recipe
from openmill.data.readers import DataError, read_documents
from openmill.data.sources import document_files
from openmill.pretokenizers import PRETOKENIZERS
from openmill.rundir import atomic_write_text

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLES = ("system", "user", "assistant")
END = "<|end|>"  # closes every chat turn
SPECIAL_TOKENS = (BOS, EOS, PAD, *(f"<|{r}|>" for r in ROLES), END)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# Bytes of each domain's valid split encoded to measure bytes/token (bounds the time on big corpora).
MEASURE_BYTES_PER_DOMAIN = 4_000_000


class Tokenizer:
    """A trained tokenizer.json with openmill's special tokens; ids are plain Python ints."""

    def __init__(self, hf: HFTokenizer, source: str = "<memory>"):
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise DataError(f"{source}: not an openmill tokenizer (special tokens missing: {', '.join(missing)})")
        hf.encode_special_tokens = True  # "<|eos|>" in a document is text, never the EOS id
        self.hf = hf
        self.special_ids = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS}

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: tokenizer file not found")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 (the library raises a bare Exception with a serde message)
            raise DataError(f"{path}: not a valid tokenizer.json ({e})") from None
        return cls(hf, str(path))

    def __getstate__(self) -> dict:
        # The library does not serialise encode_special_tokens: rebuild through __init__ instead.
        return {"json": self.hf.to_str()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(HFTokenizer.from_str(state["json"]))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self.special_ids[BOS]

    @property
    def eos_id(self) -> int:
        return self.special_ids[EOS]

    @property
    def pad_id(self) -> int:
        return self.special_ids[PAD]

    @property
    def end_id(self) -> int:
        return self.special_ids[END]

    @property
    def role_ids(self) -> dict[str, int]:
        return {r: self.special_ids[f"<|{r}|>"] for r in ROLES}

    @property
    def pretokenizer(self) -> str | None:
        """The name in PRETOKENIZERS whose split this tokenizer uses (None for a foreign one)."""
        return pretokenizer_name(json.loads(self.hf.to_str())["pre_tokenizer"])

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """Like encode on each text; the library spreads the batch over its own threads."""
        head, tail = [self.bos_id] * bos, [self.eos_id] * eos
        return [head + e.ids + tail for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Special tokens are kept as their text ("<|eos|>"); drop their ids first to hide them."""
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of every id (0 for special tokens), shape (vocab_size,), int64.

        sum(token_bytes()[ids]) == len(decode(ids).encode()) for ids without specials: the
        denominator of bits-per-byte. A byte-level token's string has one symbol per byte.
        """
        out = np.zeros(self.vocab_size, dtype=np.int64)
        specials = set(self.special_ids.values())
        for token, i in self.hf.get_vocab(with_added_tokens=True).items():
            if i not in specials:
                out[i] = len(token)
        return out

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """(ids, train) for a conversation in the chat format above.

        train[i] is True for the tokens a fine-tune learns to produce: each assistant reply and the
        <|end|> that closes it. With add_generation_prompt the ids end with <|assistant|>.
        """
        ids, train = [self.bos_id], [False]
        for n, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLES or not isinstance(content, str):
                raise ValueError(f"messages[{n}]: expected role in {ROLES} and string content, got {role!r}")
            body = self.encode(content) + [self.end_id]
            ids += [self.role_ids[role], *body]
            train += [False] + [role == "assistant"] * len(body)
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            train.append(False)
        return ids, train


# ------------------------------------------------------------------------------------ training


def new_tokenizer(pretokenizer: str) -> HFTokenizer:
    """An untrained byte-level BPE with the named split (see openmill.pretokenizers)."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = PRETOKENIZERS[pretokenizer].build()
    hf.decoder = decoders.ByteLevel()
    return hf


def pretokenizer_name(pre_tokenizer: dict | None) -> str | None:
    """The name in PRETOKENIZERS of a tokenizer.json's "pre_tokenizer" entry (None: a foreign split)."""
    for name in PRETOKENIZERS:
        if json.loads(new_tokenizer(name).to_str())["pre_tokenizer"] == pre_tokenizer:
            return name
    return None


def _sample_domain(
    files: list[Path], text_field: str, budget: int, seed: list[int]
) -> tuple[list[tuple[float, str]], int]:
    """A uniform random sample of documents holding at least `budget` bytes, in one streaming pass.

    Every document draws a key from a generator seeded by `seed`; the sample is the documents of
    smallest key whose bytes first reach the budget (a max-heap holds them, so memory is bounded by
    the budget plus one document). Returns ([(key, text)] sorted by key, bytes of the whole split).
    """
    rng = np.random.default_rng(seed)
    heap: list[tuple[float, int, int, str]] = []  # (-key, order, bytes, text): the largest key on top
    held, available = 0, 0
    order = itertools.count()
    for path in files:
        for doc in read_documents(path, text_field):
            size = len(doc.text.encode("utf-8"))
            available += size
            key = float(rng.random())  # drawn for every document, so keys do not depend on the budget
            if size == 0 or (held >= budget and key > -heap[0][0]):
                continue
            heapq.heappush(heap, (-key, next(order), size, doc.text))
            held += size
            # Drop the largest keys while the rest still reaches the budget.
            while len(heap) > 1 and held - heap[0][2] >= budget:
                held -= heapq.heappop(heap)[2]
    return sorted((-k, text) for k, _, _, text in heap), available


def _take(sample: list[tuple[float, str]], budget: int) -> list[str]:
    """The texts of `sample` in key order up to `budget` bytes, the last one cut to fit."""
    out, used = [], 0
    for _, text in sample:
        raw = text.encode("utf-8")
        if used + len(raw) > budget:
            cut = raw[: budget - used].decode("utf-8", errors="ignore")  # never half a character
            if cut:
                out.append(cut)
            break
        out.append(text)
        used += len(raw)
    return out


def training_texts(recipe: Recipe) -> tuple[dict[str, list[str]], dict[str, int]]:
    """The documents the BPE trainer sees, per domain, and each domain's available train bytes.

    Shares follow recipe.tokenizer.mixture exactly: each domain gets weight x total bytes, where
    total is max_train_bytes, lowered when a domain has too little text for its share (the other
    domains are then cut to keep the ratio rather than letting the scarce domain's share shrink).
    """
    cfg = recipe.tokenizer
    weights = {d: w for d, w in recipe.domain_weights(cfg.mixture).items() if w > 0}
    samples, available = {}, {}
    for domain, w in weights.items():
        files, text_field = document_files(recipe, domain, "train")
        # crc32 of the name: a domain's sample does not change when other domains are added.
        seed = [recipe.seed, zlib.crc32(domain.encode())]
        samples[domain], available[domain] = _sample_domain(files, text_field, max(1, round(w * cfg.max_train_bytes)), seed)
        if available[domain] == 0:
            raise DataError(f"data.domains.{domain}.train: no text for the tokenizer (mixture weight {w:.2f})")
    total = min([cfg.max_train_bytes] + [available[d] / w for d, w in weights.items()])
    return {d: _take(samples[d], round(w * total)) for d, w in weights.items()}, available


def bytes_per_token(tok: Tokenizer, texts: Iterable[str], max_bytes: int = MEASURE_BYTES_PER_DOMAIN) -> dict:
    """UTF-8 bytes per token over `texts` (read until max_bytes), the compression a model sees."""
    n_bytes = n_tokens = 0
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        n_bytes += len(text.encode("utf-8"))
        if len(batch) == 64 or n_bytes >= max_bytes:
            n_tokens += sum(len(ids) for ids in tok.encode_batch(batch))
            batch = []
        if n_bytes >= max_bytes:
            break
    n_tokens += sum(len(ids) for ids in tok.encode_batch(batch))
    return {"bytes": n_bytes, "tokens": n_tokens, "bytes_per_token": round(n_bytes / max(1, n_tokens), 4)}


def _valid_texts(recipe: Recipe, domain: str) -> Iterator[str]:
    files, text_field = document_files(recipe, domain, "valid")
    for path in files:
        for doc in read_documents(path, text_field):
            yield doc.text


def train_tokenizer(recipe: Recipe, out_dir: Path) -> tuple[list[Path], dict]:
    """The tokenizer stage: train on the mixture, write out_dir/tokenizer.json, measure on valid."""
    cfg = recipe.tokenizer
    texts, available = training_texts(recipe)
    hf = new_tokenizer(cfg.pretokenizer)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=True,
    )
    hf.train_from_iterator((t for domain_texts in texts.values() for t in domain_texts), trainer=trainer)
    tok = Tokenizer(hf)
    out = Path(out_dir) / "tokenizer.json"
    atomic_write_text(out, hf.to_str(pretty=True))

    measured = {d: bytes_per_token(tok, _valid_texts(recipe, d)) for d in recipe.data.domains}
    metrics = {
        "vocab_size": tok.vocab_size,
        "vocab_size_requested": cfg.vocab_size,
        "pretokenizer": cfg.pretokenizer,
        "special_token_ids": tok.special_ids,
        "train_bytes": {d: sum(len(t.encode("utf-8")) for t in ts) for d, ts in texts.items()},
        "train_docs": {d: len(ts) for d, ts in texts.items()},
        "available_train_bytes": available,
        "valid_bytes_per_token": {d: m["bytes_per_token"] for d, m in measured.items()},
        "valid_measured_bytes": {d: m["bytes"] for d, m in measured.items()},
    }
    if tok.vocab_size < cfg.vocab_size:
        # Too little text for that many merges of min_frequency: say so rather than pretend.
        metrics["warning"] = f"vocabulary has {tok.vocab_size} tokens, fewer than the {cfg.vocab_size} requested"
    return [out], metrics
