"""SFT conversations and DPO preference pairs from the common file formats, validated per record.

Conversations (SFT), one record each:
- alpaca:   {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
- sharegpt: {"conversations": [{"from": "human"|"gpt"|"system", "value"}], "system"?}
- messages: {"messages": [{"role": "system"|"user"|"assistant", "content"}]}  (OpenAI / TRL)
Preference pairs (DPO):
- llamafactory: {"conversations": [sharegpt turns], "chosen", "rejected"} where chosen/rejected is
  {"from": "gpt", "value"} (LLaMA-Factory) or a plain string (MedicalGPT)
- hh_rlhf:  {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...} (Anthropic HH-RLHF)
- messages: {"prompt": [messages] | str, "chosen": [assistant message] | str, "rejected": ...} (TRL)
"auto" picks the format per record from its keys. Files: .json (a list), .jsonl, either .gz.

A bad record (missing role, empty answer, unknown format, ...) stops loading with one line naming
the file, the record and the problem (bad_records="fail"), or is skipped and counted by reason
(bad_records="skip"); the counts go into the stage's manifest, so nothing is lost silently.
"""

from __future__ import annotations

import gzip
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from openmill.data.readers import DataError
from openmill.data.records import parse_json_records

CONVERSATION_FORMATS = ("auto", "alpaca", "sharegpt", "messages")
PAIR_FORMATS = ("auto", "llamafactory", "hh_rlhf", "messages")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class AlignDataError(ValueError):
    """A data file or record that cannot be used; one line naming the file and record."""


class BadRecord(ValueError):
    """Raised by a record parser; `slug` is what the skip counter counts."""

    def __init__(self, slug: str, message: str):
        super().__init__(message)
        self.slug = slug


@dataclass
class Pair:
    prompt: list[dict]  # messages ending with a user turn
    chosen: str
    rejected: str


@dataclass
class Loaded:
    items: list = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason slug -> records skipped


def read_records(path: Path) -> list:
    path = Path(path)
    if not path.is_file():
        raise AlignDataError(f"{path}: file not found")
    name = path.name.removesuffix(".gz")
    if not name.endswith((".json", ".jsonl")):
        raise AlignDataError(f"{path}: unknown file type; expected .json, .jsonl (optionally .gz)")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    try:  # non-objects are kept: each is a bad record, failed or skipped and counted by _load
        return parse_json_records(text, str(path), lines=name.endswith(".jsonl"), objects=False)
    except DataError as e:
        raise AlignDataError(str(e)) from None


def load_conversations(paths: list[Path], fmt: str = "auto", bad_records: str = "fail") -> Loaded:
    return _load(paths, fmt, bad_records, _conversation, CONVERSATION_FORMATS)


def load_pairs(paths: list[Path], fmt: str = "auto", bad_records: str = "fail") -> Loaded:
    return _load(paths, fmt, bad_records, _pair, PAIR_FORMATS)


def _load(paths, fmt, bad_records, parse, formats) -> Loaded:
    if fmt not in formats:
        raise AlignDataError(f"format {fmt!r}: unknown; choices: {', '.join(formats)}")
    out = Loaded()
    for path in paths:
        for n, record in enumerate(read_records(path)):
            try:
                out.items.append(parse(record, fmt))
            except BadRecord as e:
                if bad_records == "fail":
                    raise AlignDataError(f"{path}: record {n}: {e}") from None
                out.skipped[e.slug] += 1
    return out


# ------------------------------------------------------------------------------ conversations


def _conversation(record, fmt: str) -> list[dict]:
    fmt = _detect(record, fmt, {"messages": "messages", "conversations": "sharegpt", "instruction": "alpaca"})
    if fmt == "alpaca":
        messages = _alpaca(record)
    elif fmt == "sharegpt":
        messages = _sharegpt(record)
    else:
        messages = _messages(record.get("messages"), "messages")
    _check_conversation(messages)
    return messages


def _detect(record, fmt: str, by_key: dict[str, str]) -> str:
    if not isinstance(record, dict):
        raise BadRecord("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    if fmt != "auto":
        return fmt
    for key, name in by_key.items():
        if key in record:
            return name
    raise BadRecord("unknown_format", f"unknown format: keys {sorted(record)} match none of {', '.join(by_key.values())}")


def _text(value, where: str) -> str:
    if not isinstance(value, str):
        raise BadRecord("missing_field", f"{where}: expected a string, got {type(value).__name__}")
    return value


def _alpaca(record: dict) -> list[dict]:
    for key in ("instruction", "output"):
        if key not in record:
            raise BadRecord("missing_field", f"alpaca record without {key!r}")
    messages = [{"role": "system", "content": _text(record["system"], "system")}] if record.get("system") else []
    for i, turn in enumerate(record.get("history") or []):
        if not (isinstance(turn, list) and len(turn) == 2):
            raise BadRecord("bad_history", f"history[{i}]: expected [user, assistant]")
        messages += [{"role": "user", "content": _text(turn[0], f"history[{i}][0]")},
                     {"role": "assistant", "content": _text(turn[1], f"history[{i}][1]")}]
    user = _text(record["instruction"], "instruction")
    extra = _text(record.get("input") or "", "input")
    messages.append({"role": "user", "content": f"{user}\n{extra}" if extra else user})
    messages.append({"role": "assistant", "content": _text(record["output"], "output")})
    return messages


def _sharegpt(record: dict) -> list[dict]:
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise BadRecord("missing_field", "sharegpt record without a 'conversations' list")
    messages = [{"role": "system", "content": _text(record["system"], "system")}] if record.get("system") else []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn:
            raise BadRecord("missing_role", f"conversations[{i}]: no 'from' (role)")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise BadRecord("unknown_role", f"conversations[{i}]: role {turn['from']!r} not one of {', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": _text(turn.get("value"), f"conversations[{i}].value")})
    return messages


def _messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list):
        raise BadRecord("missing_field", f"{where}: expected a list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise BadRecord("missing_role", f"{where}[{i}]: no 'role'")
        if m["role"] not in ("system", "user", "assistant"):
            raise BadRecord("unknown_role", f"{where}[{i}]: role {m['role']!r} not one of system, user, assistant")
        out.append({"role": m["role"], "content": _text(m.get("content"), f"{where}[{i}].content")})
    return out


def _check_conversation(messages: list[dict]) -> None:
    if not messages or messages[-1]["role"] != "assistant":
        raise BadRecord("no_answer", "the conversation does not end with an assistant answer")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise BadRecord("empty_answer", f"message {i}: empty assistant answer")
        if m["role"] == "user" and not m["content"].strip():
            raise BadRecord("empty_prompt", f"message {i}: empty user message")


# ------------------------------------------------------------------------------------- pairs


def _pair(record, fmt: str) -> Pair:
    fmt = _detect(record, fmt, {"prompt": "messages", "conversations": "llamafactory", "chosen": "hh_rlhf"})
    if fmt == "llamafactory":
        prompt = _sharegpt(record)
        chosen, rejected = _answer(record.get("chosen"), "chosen"), _answer(record.get("rejected"), "rejected")
    elif fmt == "hh_rlhf":
        chosen_turns = _hh_turns(_text(record.get("chosen"), "chosen"), "chosen")
        rejected_turns = _hh_turns(_text(record.get("rejected"), "rejected"), "rejected")
        if chosen_turns[:-1] != rejected_turns[:-1]:
            raise BadRecord("prompt_mismatch", "chosen and rejected do not share the same dialogue before the last answer")
        prompt, chosen, rejected = chosen_turns[:-1], chosen_turns[-1]["content"], rejected_turns[-1]["content"]
    else:
        raw = record.get("prompt")
        prompt = [{"role": "user", "content": raw}] if isinstance(raw, str) else _messages(raw, "prompt")
        chosen, rejected = _answer(record.get("chosen"), "chosen"), _answer(record.get("rejected"), "rejected")
    if not prompt or prompt[-1]["role"] != "user":
        raise BadRecord("no_prompt", "the prompt does not end with a user turn")
    for where, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer.strip():
            raise BadRecord("empty_answer", f"{where}: empty answer")
    _check_conversation(prompt + [{"role": "assistant", "content": chosen}])
    return Pair(prompt, chosen, rejected)


def _answer(value, where: str) -> str:
    """An answer given as a string, a {"from"/"role", "value"/"content"} dict, or [one such message]."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        role = value.get("from", value.get("role"))
        if role is None:
            raise BadRecord("missing_role", f"{where}: no role ('from' or 'role')")
        if SHAREGPT_ROLES.get(role) != "assistant":
            raise BadRecord("unknown_role", f"{where}: role {role!r} is not the assistant")
        value = value.get("value", value.get("content"))
    return _text(value, where)


def _hh_turns(text: str, where: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b...' -> messages; the last must be the assistant's."""
    turns = []
    for chunk in text.split("\n\nHuman: ")[1:]:
        user, *answers = chunk.split("\n\nAssistant: ")
        turns.append({"role": "user", "content": user})
        turns += [{"role": "assistant", "content": a} for a in answers]
    if not turns or turns[-1]["role"] != "assistant":
        raise BadRecord("no_answer", f"{where}: not an HH-RLHF dialogue ending with 'Assistant:'")
    return turns
