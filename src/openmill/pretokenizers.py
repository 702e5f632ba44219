"""How text is cut into pieces before byte-level BPE merges (merges never cross a piece boundary).

Each choice is a sequence of regular expressions applied in order, every match isolated as its own
piece, then the byte-level mapping (all 256 bytes are symbols, so nothing is ever unknown).
`docs/tokenizer.md` holds the measured bytes-per-token of every choice; `recipe.tokenizer.pretokenizer`
picks one.

Where llama.cpp splits text the same way, `gguf_pre` names its pre-tokenizer type, which the GGUF
export must write as `tokenizer.ggml.pre` so llama.cpp tokenizes exactly as we do; a choice without
one cannot be exported to GGUF faithfully.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Regex, pre_tokenizers

# GPT-2 (OpenAI, 2019): letters, digits and other symbols as runs, each with one optional leading
# space. A CJK sentence is one long letter run up to its punctuation.
_GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# cl100k (GPT-4, also Llama 3): case-insensitive contractions, numbers in groups of at most three
# digits, punctuation runs that keep their trailing newlines, and newline runs (with the indentation
# before them) apart from the spaces that start the next line: code indentation stays in few tokens.
_CL100K = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# cl100k with every digit its own piece (Qwen2; LLaMA-1 did the same in SentencePiece).
_CL100K_DIGITS = _CL100K.replace(r"\p{N}{1,3}", r"\p{N}")

# Every CJK character its own piece (only the bytes of one character can merge).
_CJK_CHAR = r"[\p{Han}\p{Hiragana}\p{Katakana}]"

# DeepSeek-V3: digits in groups of three, then runs of CJK characters kept apart from Latin letters
# (so multi-character words can become tokens), then a cl100k-like rule that also glues one leading
# ASCII punctuation mark to an ASCII word (`.append`, `_name`, `"key`).
_DEEPSEEK_V3 = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
)


@dataclass(frozen=True)
class Pretokenizer:
    patterns: tuple[str, ...]  # applied in order; each match of each pattern becomes a piece
    gguf_pre: str | None  # llama.cpp pre-tokenizer type with the same split, if any

    def build(self) -> pre_tokenizers.PreTokenizer:
        splits = [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in self.patterns]
        # use_regex=False: the splits above already did the cutting; ByteLevel only maps bytes to symbols.
        return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


PRETOKENIZERS: dict[str, Pretokenizer] = {
    "gpt2": Pretokenizer((_GPT2,), "gpt-2"),
    "cl100k": Pretokenizer((_CL100K,), "llama-bpe"),
    "cl100k_digits": Pretokenizer((_CL100K_DIGITS,), "qwen2"),
    "cjk_runs": Pretokenizer(_DEEPSEEK_V3, "deepseek-v3"),
    "cjk_chars": Pretokenizer((_CJK_CHAR, _CL100K), None),
    "cjk_chars_digits": Pretokenizer((_CJK_CHAR, _CL100K_DIGITS), None),
}
