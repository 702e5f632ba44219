"""Chat templates by name, and which tokens of a rendered conversation are the assistant's.

A conversation is trained through a Jinja chat template (the model folder's own, or a named one
below for a model whose vocabulary has the template's markers). The loss mask is derived from the
template itself, not from per-template rules: render the conversation up to each assistant turn
with the generation prompt, and up to the end of that turn; the characters in between are the
assistant's answer (kept up to and including its end-of-turn marker, so the model learns to stop).
Tokens are mapped to those character spans with the tokenizer's offsets, so a BPE merge across a
boundary cannot shift the mask. A template that does not render prefix-stably is refused.
"""

from __future__ import annotations

from openmill.export.folder import TokenizerInfo
from openmill.textmodel import TextTokenizer

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# SOLAR-10.7B-Instruct's format; an EOS closes each answer so generation has a stop token.
SOLAR = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '### System:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Assistant:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)

# Llama-2-chat's template as published with the model (system prompt folded into the first user turn).
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# name -> (template, end-of-turn marker the answer is trained up to; None = the tokenizer's EOS)
NAMED = {"chatml": (CHATML, "<|im_end|>"), "solar": (SOLAR, None), "llama2": (LLAMA2, None)}


def with_template(tok: TextTokenizer, name: str | None) -> TextTokenizer:
    """`tok` itself for None ("the folder's own"), else a copy that renders the named template.

    The template's end-of-turn marker must be a token of the vocabulary (it becomes a stop token,
    and a marker split into pieces would be learned as text)."""
    if name is None:
        return tok
    if name not in NAMED:
        raise ValueError(f"chat template {name!r}: unknown; choices: {', '.join(NAMED)} (or none for the folder's own)")
    template, end = NAMED[name]
    end = end or tok.info.eos_token
    if end is None or tok.hf.token_to_id(end) is None:
        raise ValueError(f"chat template {name!r} needs {end!r} as a single token; {tok.source} has no such token")
    info = TokenizerInfo(**{**tok.info.__dict__, "chat_template": template, "stop_tokens": [end]})
    return TextTokenizer(tok.hf, info, tok.source)


def encode_conversation(tok: TextTokenizer, messages: list[dict],
                        last_answer_only: bool = False) -> tuple[list[int], list[bool]]:
    """(ids, assistant) for a whole conversation: assistant[i] is True for the tokens of every
    assistant answer and its end-of-turn marker, False for system/user turns and template text.
    With `last_answer_only`, only the last assistant answer is marked (a DPO pair's answer, whose
    prompt may hold earlier assistant turns)."""
    text = tok.render_chat(messages)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if last_answer_only:
        answers = answers[-1:]
    spans = []
    for i in answers:
        m = messages[i]
        before = tok.render_chat(messages[:i], add_generation_prompt=True)
        through = tok.render_chat(messages[: i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(f"{tok.source}: the chat template does not render turn {i} as a prefix of the conversation")
        end = _end_of_answer(tok, through, len(before), m["content"])
        if end <= len(before):
            raise ValueError(f"{tok.source}: the chat template renders nothing for the answer of turn {i}; "
                             "it could not be trained")
        spans.append((len(before), end))
    _, ids, offsets = tok.encode_messages(messages)
    mask = [any(s < end and e > start for s, e in spans) for start, end in offsets]
    return ids, mask


def _end_of_answer(tok: TextTokenizer, through: str, start: int, content: str) -> int:
    """Where the trained part of an answer ends: after the first stop marker that follows the
    content (template text after it, e.g. ChatML's newline, is not the answer's to predict).
    A template may change the content (Llama-2 strips it): then the marker is searched from the
    answer's start, never before it, where an earlier turn's marker would end the span."""
    found_at = through.find(content, start) if content else -1
    after = found_at + len(content) if found_at >= 0 else start
    markers = [t for t in (*tok.info.stop_tokens, tok.info.eos_token) if t]
    found = [(through.find(t, after), t) for t in markers]
    found = [(e, t) for e, t in found if e >= 0]
    if not found:
        return len(through)
    e, t = min(found)
    return e + len(t)
