"""C4 line rules (Raffel et al. 2020, section 2.2) as an editor: drop bad lines, then judge what is left.

Off by default: it rewrites documents (books lose their headings and dialogue lines without a
full stop), which is right for web crawls and wrong for the curated sources of the demo.
Terminal punctuation includes the Chinese full-width marks, and word counts are CJK-aware.
"""

from __future__ import annotations

import re
from typing import Literal

from openmill.data.curate.config import C4Config
from openmill.data.curate.doc import DocView

TERMINAL = (".", "!", "?", '"', "'", "”", "’", "。", "！", "？", "」", "』", "…", "；")
POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_SENTENCE_END_RE = re.compile(r"[.!?。！？]+(?:[\"'”’」』]|\s|$)")


class C4LineEditor:
    name = "c4"

    def __init__(self, cfg: C4Config, cjk_chars_per_word: float = 1.5):
        self.cfg = cfg
        self.cpw = cjk_chars_per_word

    def __call__(self, doc: DocView) -> str | tuple[Literal[False], str]:
        c = self.cfg
        lower = doc.text.lower()
        if c.reject_lorem_ipsum and "lorem ipsum" in lower:
            return False, "lorem_ipsum"
        if c.reject_curly_bracket and "{" in doc.text:
            return False, "curly_bracket"
        kept = []
        for line in doc.lines:
            s = line.strip()
            if not s:
                kept.append("")
                continue
            low = s.lower()
            if c.drop_lines_without_terminal_punctuation and not s.endswith(TERMINAL):
                continue
            if DocView(s, self.cpw).words < c.min_words_per_line:
                continue
            if c.drop_javascript_lines and "javascript" in low:
                continue
            if c.drop_policy_lines and any(p in low for p in POLICY):
                continue
            kept.append(line)
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
        if not text:
            return False, "no_lines_left"
        if len(_SENTENCE_END_RE.findall(text)) < c.min_sentences:
            return False, "sentences_below_min"
        return text
