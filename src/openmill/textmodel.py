"""Any model folder as text in, text out: the model plus a tokenizer that follows the folder's rules.

A folder trained by openmill uses openmill's special tokens and chat format; one imported from
Hugging Face or GGUF (SmolLM2, say) keeps its own BOS/EOS, stop tokens and Jinja chat template,
recorded in model.json (export/folder.py, TokenizerInfo). Everything that serves, chats with,
evaluates or fine-tunes a model goes through `TextTokenizer`, so it works for both kinds alike.

Two encodings, on purpose:
- `encode(text)`: a document or a raw prompt. Special-token strings in the text stay text
  ("<|im_end|>" typed by a user is never an end of turn), as in openmill's own tokenizer.
- `encode_chat(messages)`: the chat template rendered to a string, its markers encoded as the
  special tokens they are. Marker text inside a message stays text, so a message cannot forge a
  turn (transformers' apply_chat_template(tokenize=True) would let it); a conversation without
  such text gives exactly transformers' ids. `encode_rendered` does the same for a rendering cut
  short or followed by text (evaluation's prompt/answer split).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer

from openmill.export.folder import ExportError, ModelFolder, TokenizerInfo


class TextTokenizer:
    """tokenizer.json + the folder's TokenizerInfo; ids are plain Python ints."""

    def __init__(self, hf: HFTokenizer, info: TokenizerInfo, source: str = "<memory>"):
        self.hf, self.info, self.source = hf, info, source
        vocab = hf.get_vocab(with_added_tokens=True)
        for field in ("bos_token", "eos_token", "pad_token"):
            token = getattr(info, field)
            if token is not None and token not in vocab:
                raise ExportError(f"{source}: {field} {token!r} is not in the vocabulary")
        missing = [t for t in info.stop_tokens if t not in vocab]
        if missing:
            raise ExportError(f"{source}: stop token(s) {missing} not in the vocabulary")
        self._vocab = vocab

    @classmethod
    def from_folder(cls, folder: str | Path | ModelFolder) -> TextTokenizer:
        folder = folder if isinstance(folder, ModelFolder) else ModelFolder.open(Path(folder))
        path = folder.path / "tokenizer.json"
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 (the library raises a bare Exception with a serde message)
            raise ExportError(f"{path}: not a valid tokenizer.json ({e})") from None
        return cls(hf, folder.tokenizer, str(path))

    # ------------------------------------------------------------------ ids of the special tokens

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._vocab[token]

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.info.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.info.eos_token)

    @property
    def pad_id(self) -> int:
        """PAD, else EOS: what a batch is padded with (masked out of attention and loss anyway)."""
        return self.token_id(self.info.pad_token) if self.info.pad_token is not None else self.eos_id or 0

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: EOS for documents, the end-of-turn marker for chat."""
        ids = [self._vocab[t] for t in self.info.stop_tokens]
        if self.eos_id is not None and self.eos_id not in ids:
            ids.append(self.eos_id)
        return tuple(ids)

    @cached_property
    def special_ids(self) -> frozenset[int]:
        added = json.loads(self.hf.to_str()).get("added_tokens", [])
        return frozenset(t["id"] for t in added if t.get("special"))

    @cached_property
    def special_strings(self) -> tuple[str, ...]:
        added = json.loads(self.hf.to_str()).get("added_tokens", [])
        return tuple(t["content"] for t in added if t.get("special"))

    def document_prefix(self) -> list[int]:
        """What a plain document starts after: EOS for openmill-trained models (their shards
        separate documents with EOS), BOS for a model that adds one, else nothing."""
        from openmill.tokenizer import BOS, EOS

        if (self.info.bos_token, self.info.eos_token) == (BOS, EOS):
            return [self.eos_id]
        return [self.bos_id] if self.info.add_bos_token and self.bos_id is not None else []

    # ------------------------------------------------------------------ text <-> ids

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Text as text: special-token strings inside it are encoded as ordinary characters."""
        self.hf.encode_special_tokens = True
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        self.hf.encode_special_tokens = True
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The folder's Jinja chat template applied to `messages` (as transformers renders it)."""
        if self.info.chat_template is None:
            raise ExportError(f"{self.source}: this model has no chat template")
        for n, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{n}]: expected {{'role': str, 'content': str}}, got {m!r}")
        return _compiled_template(self.info.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.info.bos_token or "",
            eos_token=self.info.eos_token or "",
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        return self.encode_messages(messages, add_generation_prompt)[1]

    def encode_messages(
        self, messages: list[dict], add_generation_prompt: bool = False
    ) -> tuple[str, list[int], list[tuple[int, int]]]:
        """(rendered text, ids, character offsets) of a conversation. The template's own markers
        become special tokens; in a message a marker's text stays text, so a message cannot forge a
        turn ("...<|end|><|assistant|>..."). A conversation whose messages hold no marker text is
        encoded in one piece, exactly as transformers encodes a rendered template; the others are
        encoded piece by piece around those messages."""
        text = self.render_chat(messages, add_generation_prompt)
        spans = self._marker_bearing_spans(messages, add_generation_prompt, text)
        ids, offsets = self._encode_keeping_text(text, spans)
        return text, ids, offsets

    def encode_rendered(self, messages: list[dict], text: str, add_generation_prompt: bool = False) -> list[int]:
        """Ids of `text`: the rendered conversation cut short, or followed by a tail. This is how
        lm-evaluation-harness splits a chat prompt from the answer it scores (eval/runner.py: ids of
        the prompt without its trailing whitespace, then of prompt + answer). As in encode_messages,
        the template's markers are special tokens and the messages' text stays text; so does the
        tail, the evaluated answer. Text of ordinary messages and tails gives the ids of encoding
        `text` in one piece with markers recognised, as transformers does."""
        rendered = self.render_chat(messages, add_generation_prompt)
        if not (rendered.startswith(text) or text.startswith(rendered)):
            raise ValueError("text is neither a prefix nor a continuation of the rendered conversation")
        end = len(rendered)
        spans = self._marker_bearing_spans(messages, add_generation_prompt, rendered)
        spans = [(begin, min(stop, len(text))) for begin, stop in spans if begin < len(text)]
        # A marker ending in the tail (even one the template's last characters begin) stays text.
        if any(s in text[max(0, end - len(s) + 1) :] for s in self.special_strings):
            spans.append((end, len(text)))
        return self._encode_keeping_text(text, spans)[0]

    def encode_with_specials(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of `text` in one piece with every special-token string in it encoded as the special
        token, wherever it came from: what transformers' `tokenizer.encode(text)` gives, and so how
        lm-evaluation-harness encodes its chat-rendered contexts. add_special_tokens: let
        tokenizer.json's post-processor add its tokens (BOS, in Llama 3 style folders), as
        transformers does unless told not to. Prefer encode_messages for anything else."""
        return self._encode_piece(text, markers=True, add_special_tokens=add_special_tokens).ids

    def _encode_piece(self, text: str, markers: bool, add_special_tokens: bool = False):
        """The library's Encoding of `text`, special-token strings as the special tokens (markers)
        or as text; the tokenizer is left in its text mode, the default every other encode relies on."""
        self.hf.encode_special_tokens = not markers
        try:
            return self.hf.encode(text, add_special_tokens=add_special_tokens)
        finally:
            self.hf.encode_special_tokens = True

    def _encode_keeping_text(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, character offsets) of `text` with special-token strings encoded as the special
        tokens, except inside `spans` (sorted, disjoint (start, end)): each of those is encoded on
        its own, as text. No spans: one piece, exactly as transformers encodes it."""
        pieces, start = [], 0  # (start, end, as_text)
        for begin, end in spans:
            pieces += [(start, begin, False), (begin, end, True)]
            start = end
        pieces.append((start, len(text), False))
        ids, offsets = [], []
        for begin, end, as_text in pieces:
            if begin == end:
                continue
            enc = self._encode_piece(text[begin:end], markers=not as_text)
            ids += enc.ids
            offsets += [(begin + a, begin + b) for a, b in enc.offsets]
        return ids, offsets

    def _marker_bearing_spans(self, messages: list[dict], add_generation_prompt: bool, text: str) -> list[tuple[int, int]]:
        """Where in `text` the messages holding a special token's text were rendered. Found by
        rendering with a placeholder for every message (a search for the content could match the
        template's own text, e.g. a message that is just "<|im_start|>")."""
        bearing = {n for n, m in enumerate(messages) if any(s in m["content"] for s in self.special_strings)}
        if not bearing:
            return []
        masked = [{**m, "content": f"\ue000{n}\ue001"} for n, m in enumerate(messages)]
        spans, rebuilt, at = [], [], 0
        for piece in _PLACEHOLDER.split(self.render_chat(masked, add_generation_prompt)):
            n = int(piece[1:-1]) if _PLACEHOLDER.fullmatch(piece) else None
            piece = messages[n]["content"] if n is not None else piece
            if n in bearing:
                spans.append((at, at + len(piece)))
            rebuilt.append(piece)
            at += len(piece)
        if "".join(rebuilt) != text:  # the template changes what it is given (strips, inspects it)
            first = min(bearing)
            raise ValueError(f"messages[{first}]: holds special-token text and the chat template rewrites "
                             "messages, so it cannot be kept as text")
        return spans

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of every id (0 for special tokens), shape (vocab_size,): bits-per-byte's
        denominator. Needs a byte-level BPE (one symbol per byte), as openmill's and GPT-2's are."""
        decoder = json.loads(self.hf.to_str()).get("decoder") or {}
        if decoder.get("type") != "ByteLevel":
            raise ExportError(f"{self.source}: bytes per token need a byte-level tokenizer (decoder is {decoder.get('type')!r})")
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in self._vocab.items():
            if i not in self.special_ids:
                out[i] = len(token)
        return out


_PLACEHOLDER = re.compile("(\ue000\\d+\ue001)")  # private-use characters around a message's index

# Compiling a template costs ~9 ms, rendering it a fraction of that; the alignment stages render
# each conversation several times (align/templates.py), so one compile per template (transformers
# caches its compiled chat templates alike).
@lru_cache(maxsize=16)
def _compiled_template(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    # The environment transformers renders chat templates in, so both give the same string.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def load_text_model(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model in eval mode, TextTokenizer) for any openmill model folder."""
    from openmill.train.pretrain import load_model_folder

    opened = ModelFolder.open(Path(folder))
    model, _ = load_model_folder(opened.path, device=device)
    if dtype is not None:
        model.to(dtype)
    return model.eval(), TextTokenizer.from_folder(opened)

