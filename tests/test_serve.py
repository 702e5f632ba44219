"""The OpenAI-compatible server, driven by the real `openai` client against a live uvicorn.

A tiny randomised model with a real (small) BPE tokenizer: answers are checked token for token
against the engine run offline with the same greedy settings, so "complete and correct" means
exactly the text the model produces alone.
"""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from openmill.generate import SamplingParams, generate_batch  # noqa: E402
from openmill.serve.app import ServeLimits, create_app  # noqa: E402
from openmill.textmodel import load_text_model  # noqa: E402

from .test_export_hf import make_model_folder, train_small_tokenizer  # noqa: E402

KEY = "sk-openmill-test"
NAME = "tiny-test"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return make_model_folder(root, train_small_tokenizer(root / "tok"), seed=11, max_seq_len=64)


@pytest.fixture(scope="module")
def server(model_folder):
    import uvicorn

    model, tok = load_text_model(model_folder)
    app = create_app(model, tok, NAME, ServeLimits(max_batch=8, max_context=64, max_tokens=32), api_key=KEY)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def offline(model_folder):
    """What the engine answers alone: completion and chat text for a prompt, greedy."""
    model, tok = load_text_model(model_folder)

    def run(ids):
        params = SamplingParams(max_new_tokens=MAX_TOKENS, temperature=0)
        return generate_batch(model, [ids], params, stop_ids=tok.stop_ids, decode=tok.decode)[0].text

    def completion(prompt):
        return run(tok.document_prefix() + tok.encode(prompt))

    def chat(messages):
        return run(tok.encode_chat(messages, add_generation_prompt=True))

    return completion, chat


def client(url, key=KEY):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


PROMPTS = ["Alice was beginning to", "中华人民共和国", "def fib(n):", "The quick brown fox"]


def test_plain_streaming_and_chat_calls_give_the_offline_answers(server, offline):
    url, _ = server
    c = client(url)
    assert [m.id for m in c.models.list().data] == [NAME]
    completion, chat = offline
    r = c.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].text == completion(PROMPTS[0]) and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(c.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == completion(PROMPTS[1])
    assert chunks[-1].choices[0].finish_reason is not None

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello! 你好"}]
    r = c.chat.completions.create(model=NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == chat(messages)

    stream = c.chat.completions.create(
        model=NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat(messages)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0  # the usage chunk comes last


def test_stream_is_openai_server_sent_events_ending_with_done(server):
    url, _ = server
    body = {"model": NAME, "prompt": "Alice", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_sixteen_concurrent_clients_are_batched_and_all_correct(server, offline):
    url, app = server
    completion, chat = offline
    worker = app.state.worker
    steps0, rows0 = worker.steps, worker.rows_decoded
    jobs = [(i, PROMPTS[i % 4] + " " * (i // 4)) for i in range(16)]

    def ask(job):
        i, prompt = job
        c = client(url)
        if i % 2:
            return c.chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0
            ).choices[0].message.content
        return c.completions.create(model=NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    for (i, prompt), answer in zip(jobs, answers):
        assert answer == (chat([{"role": "user", "content": prompt}]) if i % 2 else completion(prompt)), i
    # Batched, not serialized: decode steps carried several requests at once on average.
    assert (worker.rows_decoded - rows0) / (worker.steps - steps0) > 2


@pytest.mark.parametrize(
    "body, key, status, code_or_type",
    [
        ('{"model": "tiny-test", "prompt": "hi"', KEY, 400, "invalid_request_error"),  # malformed JSON
        ({"model": "gpt-4", "prompt": "hi"}, KEY, 404, "model_not_found"),
        ({"model": NAME, "prompt": "hi", "max_tokens": -1}, KEY, 400, "invalid_request_error"),
        ({"model": NAME, "prompt": "word " * 200}, KEY, 400, "context_length_exceeded"),
        ({"model": NAME, "prompt": "hi", "max_tokens": 33}, KEY, 400, "invalid_request_error"),  # over the limit
        ({"model": NAME, "prompt": "hi"}, "sk-wrong", 401, "invalid_api_key"),
    ],
    ids=["malformed-json", "unknown-model", "negative-max-tokens", "over-context", "over-max-tokens", "wrong-key"],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, key, status, code_or_type):
    url, _ = server
    content = body if isinstance(body, str) else json.dumps(body)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    r = httpx.post(f"{url}/v1/completions", content=content, headers=headers)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["message"] and code_or_type in (error["code"], error["type"])
    # The real client maps these statuses to its exception classes.
    if isinstance(body, dict):
        expected = {400: openai.BadRequestError, 401: openai.AuthenticationError, 404: openai.NotFoundError}[status]
        with pytest.raises(expected):
            client(url, key).completions.create(**body)
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert client(url).completions.create(model=NAME, prompt="ok", max_tokens=2, temperature=0).choices[0].finish_reason
