"""Loss masks: exactly the assistant answers (and their end-of-turn marker) of each template."""

from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer

from openmill.align.templates import NAMED, encode_conversation, with_template
from openmill.export.folder import TokenizerInfo
from openmill.textmodel import TextTokenizer
from openmill.tokenizer import Tokenizer

from .test_export_hf import make_model_folder, tokenizer_path  # noqa: F401 (fixture)

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "北京是哪个国家的首都？"},
    {"role": "assistant", "content": "中国。 It is the capital."},
    {"role": "user", "content": "And 2+2?"},
    {"role": "assistant", "content": "4, of course.\nDone"},
]


def answer_runs(tok: TextTokenizer, ids: list[int], mask: list[bool]) -> list[str]:
    """The decoded text of each maximal run of masked tokens."""
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r, skip_special=False) for r in runs]


def marker_tokenizer(tokenizer_path: Path) -> TextTokenizer:
    """The small openmill BPE plus the markers of every named template, as an import describes them."""
    hf = HFTokenizer.from_file(str(tokenizer_path))
    hf.add_special_tokens(["<|im_start|>", "<|im_end|>", "<s>", "</s>"])
    return TextTokenizer(hf, TokenizerInfo("<s>", "</s>", None, ["</s>"], None, False, None), "markers")


def test_openmill_format_mask_equals_the_tokenizers_own(tmp_path, tokenizer_path):
    tok = TextTokenizer.from_folder(make_model_folder(tmp_path, tokenizer_path))
    ids, mask = encode_conversation(tok, CONVERSATION)
    assert (ids, mask) == Tokenizer.load(tokenizer_path).encode_chat(CONVERSATION)


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_template_masks_exactly_the_answers(tokenizer_path, name):
    tok = with_template(marker_tokenizer(tokenizer_path), name)
    end = NAMED[name][1] or "</s>"
    ids, mask = encode_conversation(tok, CONVERSATION)
    assert ids == tok.encode_chat(CONVERSATION)
    runs = answer_runs(tok, ids, mask)
    want = [m["content"] + end for m in CONVERSATION if m["role"] == "assistant"]
    if name == "llama2":  # Llama-2 puts one space before each answer and one before </s>
        want = [" " + m["content"] + " " + end for m in CONVERSATION if m["role"] == "assistant"]
    assert runs == want
    prompt = tok.decode([i for i, m in zip(ids, mask) if not m], skip_special=False)
    assert "北京是哪个国家的首都？" in prompt and "You answer briefly." in prompt


def test_answer_the_template_changes_is_still_trained(tokenizer_path):
    # Llama-2 strips each answer, so the answer's text is not found in the rendering; the end marker
    # must then be searched after the answer's start, not where an earlier turn's </s> ends it.
    tok = with_template(marker_tokenizer(tokenizer_path), "llama2")
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
                    {"role": "user", "content": "And 2+2?"}, {"role": "assistant", "content": "It is 4.\n"}]
    ids, mask = encode_conversation(tok, conversation)
    assert answer_runs(tok, ids, mask) == [" Hello there. </s>", " It is 4. </s>"]


def test_template_that_renders_no_answer_is_refused(tokenizer_path):
    tok = marker_tokenizer(tokenizer_path)
    user_only = ("{% for message in messages %}{% if message['role'] == 'user' %}"
                 "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
    tok = TextTokenizer(tok.hf, TokenizerInfo(**{**tok.info.__dict__, "chat_template": user_only}), "user-only")
    with pytest.raises(ValueError, match="user-only: the chat template renders nothing for the answer of turn 1"):
        encode_conversation(tok, CONVERSATION[1:3])


def test_last_answer_only_marks_the_final_answer(tokenizer_path):
    tok = with_template(marker_tokenizer(tokenizer_path), "chatml")
    ids, mask = encode_conversation(tok, CONVERSATION, last_answer_only=True)
    assert answer_runs(tok, ids, mask) == [CONVERSATION[-1]["content"] + "<|im_end|>"]


def test_template_needing_a_missing_marker_is_refused(tmp_path, tokenizer_path):
    tok = TextTokenizer.from_folder(make_model_folder(tmp_path, tokenizer_path))
    with pytest.raises(ValueError, match="needs '<\\|im_end\\|>' as a single token"):
        with_template(tok, "chatml")
    with pytest.raises(ValueError, match="unknown; choices"):
        with_template(tok, "vicuna")


@pytest.mark.slow
def test_smollm2_template_mask(smollm2_folder):
    tok = TextTokenizer.from_folder(smollm2_folder)
    for conversation in (CONVERSATION, CONVERSATION[1:]):  # own system prompt, and the template's default
        ids, mask = encode_conversation(tok, conversation)
        assert ids == tok.encode_chat(conversation)
        assert answer_runs(tok, ids, mask) == [m["content"] + "<|im_end|>" for m in conversation if m["role"] == "assistant"]
