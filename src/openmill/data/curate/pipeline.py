"""One domain's chain: normalize, then filters and editors in order, then PII masking.

`DomainPipeline.process(text)` is the whole per-document hot path; it returns an `Outcome` and
keeps per-step counters (documents and UTF-8 bytes in and out of every step, drops per slug).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from openmill.data.curate.c4 import C4LineEditor
from openmill.data.curate.code import CodeFilter
from openmill.data.curate.config import Rules
from openmill.data.curate.doc import DocView
from openmill.data.curate.filters import LengthFilter
from openmill.data.curate.langid import LanguageFilter
from openmill.data.curate.pii import PiiMasker
from openmill.data.curate.quality import GopherQualityFilter
from openmill.data.curate.repetition import GopherRepetitionFilter
from openmill.data.curate.text import normalize


@dataclass
class Outcome:
    doc: DocView  # the final view: its text is what is kept
    signals: dict[str, float]  # every signal a step computed, on the text that step saw
    filter: str | None = None  # None: kept
    reason: str | None = None


@dataclass
class StepStats:
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            **{k: getattr(self, k) for k in ("docs_in", "docs_out", "bytes_in", "bytes_out")},
            "dropped": dict(self.dropped),
        }


def build_steps(rules: Rules) -> list:
    steps: list = []
    if rules.length.enabled:
        steps.append(LengthFilter(rules.length))
    if rules.langid.enabled:
        steps.append(LanguageFilter(rules.langid, rules.languages))
    if rules.quality.enabled:
        steps.append(GopherQualityFilter(rules.quality))
    if rules.repetition.enabled:
        steps.append(GopherRepetitionFilter(rules.repetition))
    if rules.c4.enabled:
        steps.append(C4LineEditor(rules.c4, rules.cjk_chars_per_word))
    if rules.code.enabled:
        steps.append(CodeFilter(rules.code))
    return steps


class DomainPipeline:
    def __init__(self, rules: Rules):
        self.rules = rules
        self.steps = build_steps(rules)
        self.masker = PiiMasker(rules.pii) if rules.pii.enabled else None
        self.stats = {s.name: StepStats() for s in self.steps}
        self.pii_masked: Counter = Counter()

    def process(self, text: str) -> Outcome:
        doc = DocView(normalize(text, self.rules.normalize), self.rules.cjk_chars_per_word)
        signals: dict[str, float] = {}  # kept across views: the report plots what each filter judged
        nbytes = len(doc.text.encode("utf-8"))
        for step in self.steps:
            st = self.stats[step.name]
            st.docs_in += 1
            st.bytes_in += nbytes
            verdict = step(doc)
            if isinstance(verdict, tuple):
                st.dropped[verdict[1]] += 1
                return Outcome(doc, signals | doc.signals(), step.name, verdict[1])
            if isinstance(verdict, str):  # an editor's new text: later steps see a fresh view
                signals |= doc.signals()
                doc = DocView(verdict, self.rules.cjk_chars_per_word)
                nbytes = len(verdict.encode("utf-8"))
            st.docs_out += 1
            st.bytes_out += nbytes
        signals |= doc.signals()
        if self.masker is not None:
            masked, counts = self.masker.mask(doc.text)
            self.pii_masked.update(counts)
            if masked != doc.text:
                doc = DocView(masked, self.rules.cjk_chars_per_word)
        return Outcome(doc, signals)
