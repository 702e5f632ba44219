"""`openmill chat MODEL`: a terminal conversation with streaming output.

Multi-turn: every turn re-renders the whole history with the model's chat template and prefills
it (simple, and exactly what the server does for the same messages). Commands: /reset forgets
the conversation (the system prompt stays), /exit or end of input quits. When the history no
longer fits the context, the oldest turns are dropped and a note says so.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace

from openmill.generate import Engine, PromptTooLong, SamplingParams
from openmill.textmodel import TextTokenizer


def reply(engine: Engine, tok: TextTokenizer, messages: list[dict], params: SamplingParams, write: Callable[[str], None]) -> str:
    """Stream the assistant's answer to `messages` through `write`; return its text."""
    ids = tok.encode_chat(messages, add_generation_prompt=True)
    room = engine.max_len - len(ids)
    if room <= 0:  # checked here: a negative max_new_tokens would fail as a bad sampling setting
        raise PromptTooLong(f"the conversation has {len(ids)} tokens; this model's context is {engine.max_len}")
    seq = engine.add(ids, replace(params, max_new_tokens=min(params.max_new_tokens, room)), tok.stop_ids)
    write(seq.delta)
    while not seq.done:
        engine.step()
        write(seq.delta)
    return seq.text


def fit_history(tok: TextTokenizer, messages: list[dict], context: int, reserve: int) -> list[dict]:
    """Drop the oldest user/assistant turns (never the system prompt or the last message) until
    the rendered prompt leaves `reserve` tokens of room."""
    head = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(head) :]
    while len(turns) > 1 and len(tok.encode_chat(head + turns, add_generation_prompt=True)) > context - reserve:
        turns = turns[2:] if len(turns) > 2 else turns[1:]
    return head + turns


def run_chat(
    engine: Engine,
    tok: TextTokenizer,
    params: SamplingParams,
    system: str | None = None,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = lambda s: (sys.stdout.write(s), sys.stdout.flush()),
) -> list[dict]:
    """The REPL; returns the final history (for tests)."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    write("openmill chat: /reset to start over, /exit to quit\n")
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return messages
        if line.strip() in ("/exit", "/quit"):
            return messages
        if line.strip() == "/reset":
            messages = list(start)
            write("(conversation reset)\n")
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        fitted = fit_history(tok, messages, engine.max_len, reserve=min(params.max_new_tokens, engine.max_len // 2))
        if len(fitted) < len(messages):
            write(f"(dropped {len(messages) - len(fitted)} old message(s) to fit the context of {engine.max_len})\n")
            messages = fitted
        try:
            answer = reply(engine, tok, messages, params, write)
        except ValueError as e:  # still too long: the last message alone fills the context
            write(f"error: {e}\n")
            messages.pop()
            continue
        write("\n")
        messages.append({"role": "assistant", "content": answer})
