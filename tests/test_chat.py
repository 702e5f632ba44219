"""The terminal chat, scripted: streamed answers equal the engine's, history and /reset work."""

import pytest

from openmill.generate import Engine, PromptTooLong, SamplingParams, generate_batch
from openmill.serve.chat import reply, run_chat
from openmill.textmodel import load_text_model

from .test_export_hf import make_model_folder, train_small_tokenizer

GREEDY = SamplingParams(max_new_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def model_tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return load_text_model(make_model_folder(root, train_small_tokenizer(root / "tok"), seed=5, max_seq_len=64))


def script(*lines):
    """A reader that gives `lines`, then end of input (Ctrl-D)."""
    it = iter(lines)

    def read(_prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def answer(model, tok, messages):
    ids = tok.encode_chat(messages, add_generation_prompt=True)
    return generate_batch(model, [ids], GREEDY, stop_ids=tok.stop_ids, decode=tok.decode)[0].text


def test_chat_streams_multi_turn_answers_and_reset_forgets(model_tok):
    model, tok = model_tok
    read = script("hello", "and then?", "/reset", "hello", "/exit")
    out: list[str] = []
    history = run_chat(Engine(model, max_batch=1, max_len=64, decode=tok.decode), tok, GREEDY, system="Be brief.", read=read, write=out.append)
    system = {"role": "system", "content": "Be brief."}
    first = answer(model, tok, [system, {"role": "user", "content": "hello"}])
    second_turn = [system, {"role": "user", "content": "hello"}, {"role": "assistant", "content": first}, {"role": "user", "content": "and then?"}]
    second = answer(model, tok, second_turn)
    text = "".join(out)
    assert text.count(first) >= 2 and second in text and "(conversation reset)" in text
    assert history == [system, {"role": "user", "content": "hello"}, {"role": "assistant", "content": first}]
    assert len(out) > 6  # streamed in pieces, not one write per answer


def test_chat_drops_old_turns_when_the_context_is_full(model_tok):
    model, tok = model_tok
    read = script("a long message " * 6, "another long message " * 5, "short")
    out: list[str] = []
    history = run_chat(Engine(model, max_batch=1, max_len=64, decode=tok.decode), tok, GREEDY, read=read, write=out.append)
    assert "old message(s)" in "".join(out)
    assert history[-2]["content"] == "short" and len(tok.encode_chat(history)) <= 64


def test_a_message_longer_than_the_context_is_named_and_dropped(model_tok):
    """The last message alone overflows: the error gives its length and the context (it used to
    be "max_new_tokens: invalid value -N"), the message leaves the history and the chat goes on."""
    model, tok = model_tok
    engine = Engine(model, max_batch=1, max_len=64, decode=tok.decode)
    too_long = [{"role": "user", "content": "word " * 100}]
    n = len(tok.encode_chat(too_long, add_generation_prompt=True))
    with pytest.raises(PromptTooLong, match=f"has {n} tokens; this model's context is 64"):
        reply(engine, tok, too_long, GREEDY, write=lambda _: None)
    out: list[str] = []
    history = run_chat(engine, tok, GREEDY, read=script("word " * 100, "hello"), write=out.append)
    assert f"error: the conversation has {n} tokens; this model's context is 64" in "".join(out)
    assert [m["content"] for m in history] == ["hello", answer(model, tok, [{"role": "user", "content": "hello"}])]
