"""The OpenAI-compatible server, driven by the real `openai` client against a live uvicorn.

A tiny randomised model with a real (small) BPE tokenizer: answers are checked token for token
against the engine run offline with the same greedy settings, so "complete and correct" means
exactly the text the model produces alone.
"""

import asyncio
import dataclasses
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from openmill.generate import Engine, SamplingParams, generate_batch  # noqa: E402
from openmill.generate.engine import Request  # noqa: E402
from openmill.serve.app import ServeLimits, create_app  # noqa: E402
from openmill.serve.worker import BatchWorker, Job  # noqa: E402
from openmill.textmodel import TextTokenizer, load_text_model  # noqa: E402

from .test_export_hf import make_model_folder, train_small_tokenizer  # noqa: E402
from .test_model import randomised, tiny  # noqa: E402

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


def test_chat_takes_text_content_parts_and_the_developer_role(server, offline, model_tok):
    """What current OpenAI clients send: content as a list of text parts, and "developer" for the
    instructions. The prompt is the one for the parts' text concatenated, under "system"."""
    url, _ = server
    _, chat = offline
    _, tok = model_tok
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hello! 你好"}]},
    ]
    r = client(url).chat.completions.create(model=NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello! 你好"}]
    # The fixture's template writes each role's name, so "developer" passed through would differ.
    assert r.usage.prompt_tokens == len(tok.encode_chat(plain, add_generation_prompt=True))
    assert r.choices[0].message.content == chat(plain)


def test_completion_prompt_may_be_token_ids(server, offline, model_tok):
    """A prompt of token ids is the prompt as given (no document prefix added); a list holding one
    prompt is that prompt. Ids must have an embedding row: 0 to vocab_size - 1."""
    url, _ = server
    completion, _ = offline
    _, tok = model_tok
    c = client(url)
    ids = tok.document_prefix() + tok.encode(PROMPTS[0])
    for prompt in (ids, [ids], [PROMPTS[0]]):
        r = c.completions.create(model=NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].text == completion(PROMPTS[0]) and r.usage.prompt_tokens == len(ids), prompt
    last_id = c.completions.create(model=NAME, prompt=[tok.vocab_size - 1], max_tokens=2, temperature=0)
    assert last_id.choices[0].finish_reason
    with pytest.raises(openai.BadRequestError, match=f"token id {tok.vocab_size} .* outside this model's vocabulary"):
        c.completions.create(model=NAME, prompt=[5, tok.vocab_size], max_tokens=2)


def test_top_p_zero_keeps_only_the_most_likely_token(server, offline):
    """OpenAI takes 0 <= top_p <= 1. At 0 the nucleus is the top token alone: sampling at any
    temperature and seed gives the greedy answer (the nucleus filter alone would keep no token and
    sample from nan probabilities)."""
    url, _ = server
    completion, _ = offline
    c = client(url)
    for seed in range(3):
        r = c.completions.create(
            model=NAME, prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=1.5, top_p=0, seed=seed
        )
        assert r.choices[0].text == completion(PROMPTS[2]), seed


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


# ------------------------------------------------------------------ one bad request, one absent client


@pytest.fixture(scope="module")
def model_tok(model_folder):
    return load_text_model(model_folder)


def variant(tok, **info_fields):
    """The fixture's tokenizer with some of its folder facts changed (as another model's would be)."""
    return TextTokenizer(tok.hf, dataclasses.replace(tok.info, **info_fields))


REFUSING_TEMPLATE = (
    "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with a user message') }}{% endif %}"
    "{% for m in messages %}{{ m['content'] }}{% endfor %}"
)
NO_PREFIX = dict(bos_token=None, add_bos_token=False)  # a plain document starts after nothing


@pytest.mark.parametrize(
    "info, path, body, param, says",
    [
        (NO_PREFIX, "/v1/completions", {"prompt": ""}, "prompt", "the prompt is empty"),
        (NO_PREFIX, "/v1/completions", {"prompt": "", "stream": True}, "prompt", "the prompt is empty"),
        ({}, "/v1/completions", {"prompt": "hi", "seed": 2**70}, "seed", "less than or equal to 9223372036854775807"),
        ({}, "/v1/completions", {"prompt": "word " * 200}, "prompt", "context is 64"),
        ({"chat_template": REFUSING_TEMPLATE}, "/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]},
         "messages", "refused the conversation: Conversation must start with a user message"),
        ({"chat_template": None}, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
         "messages", "no chat template; send plain text to /v1/completions"),
        ({}, "/v1/chat/completions",
         {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]},
         "messages.0.content.1.type", "'image_url' content is not supported; this model takes only text parts"),
        ({}, "/v1/chat/completions",
         {"messages": [{"role": "system", "content": "Transcribe."},
                       {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]},
         "messages.1.content.0.type", "'input_audio' content is not supported"),
        ({}, "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
         "messages.0.content.0.text", "a text part needs its text"),
        ({}, "/v1/completions", {"prompt": ["Alice", "Bob"]}, "prompt", "one prompt per request"),
        ({}, "/v1/completions", {"prompt": [[1, 2], [3]]}, "prompt", "one prompt per request"),
        ({}, "/v1/completions", {"prompt": [1, -1]}, "prompt", "token id -1 (position 1) is outside this model's vocabulary"),
    ],
    ids=["empty-prompt", "empty-prompt-stream", "seed-over-int64", "over-context-names-prompt", "template-refuses", "no-template",
         "image-part", "audio-part", "text-part-without-text", "batch-of-strings", "batch-of-id-lists", "negative-token-id"],
)  # fmt: skip
def test_client_mistakes_are_400s_naming_the_field(model_tok, info, path, body, param, says):
    from fastapi.testclient import TestClient

    model, tok = model_tok
    app = create_app(model, variant(tok, **info), NAME, ServeLimits(max_batch=2, max_context=64, max_tokens=8))
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post(path, json={"model": NAME, "max_tokens": 4, **body})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param and says in error["message"]
        assert c.post("/v1/completions", json={"model": NAME, "prompt": "ok", "max_tokens": 2}).status_code == 200


def test_api_key_is_compared_in_constant_time(model_tok, monkeypatch):
    """Every key check goes through hmac.compare_digest, whose time does not depend on how much of
    the key matched (`!=` returns at the first differing character, which a timing attack reads)."""
    import hmac

    from fastapi.testclient import TestClient

    compared, compare_digest = [], hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or compare_digest(a, b))
    model, tok = model_tok
    app = create_app(model, tok, NAME, ServeLimits(max_batch=2, max_context=64, max_tokens=8), api_key=KEY)
    right, wrong, absent = {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {KEY[:-1]}x"}, {}
    with TestClient(app) as c:
        assert [c.get("/v1/models", headers=h).status_code for h in (right, wrong, absent)] == [200, 401, 401]
    headers_given = sorted(given for given, _ in compared)
    assert headers_given == sorted([b"", f"Bearer {KEY[:-1]}x".encode(), f"Bearer {KEY}".encode()])
    assert {expected for _, expected in compared} == {f"Bearer {KEY}".encode()}


def test_a_tiny_temperature_answers_and_the_next_requests_still_do(model_tok):
    """temperature 1e-40 used to fail its first sampling and leave its row without a token, which
    failed every later step for everyone; it now decodes greedily."""
    from fastapi.testclient import TestClient

    model, tok = model_tok
    app = create_app(model, tok, NAME, ServeLimits(max_batch=2, max_context=64, max_tokens=8))
    with TestClient(app, raise_server_exceptions=False) as c:
        greedy, tiny = ({"model": NAME, "prompt": "Alice", "max_tokens": 6, "temperature": t} for t in (0, 1e-40))
        r = c.post("/v1/completions", json=tiny)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == c.post("/v1/completions", json=greedy).json()["choices"][0]["text"]
        assert [c.post("/v1/completions", json=greedy).status_code for _ in range(3)] == [200] * 3
        assert not app.state.worker.engine.active


def test_worker_frees_a_row_that_no_job_owns():
    """A row holding a request no job answers for (it has no tokens to decode from) is freed before
    the next step, instead of failing that step and every one after it."""
    model = randomised(tiny(), seed=2)
    engine = Engine(model, max_batch=2, max_len=32)
    engine.rows[0] = Request([1, 2, 3], SamplingParams(4, temperature=0), frozenset(), torch.Generator(), None, row=0)
    worker = BatchWorker(engine)

    async def ask() -> tuple:
        job = Job([5, 6, 7], SamplingParams(4, temperature=0), (), asyncio.get_running_loop())
        worker.submit(job)
        while True:
            event = await asyncio.wait_for(job.events.get(), timeout=30)
            if event[0] in ("done", "error"):
                return event

    try:
        assert [asyncio.run(ask()) for _ in range(2)] == [("done", "length", 3, 4)] * 2
    finally:
        worker.close()
    assert engine.free_rows == 2


def test_closing_the_worker_answers_every_job_with_an_error():
    """A job decoding, one waiting for a row, and one submitted after close all get an "error"
    event, instead of leaving their handlers waiting forever for a "done"."""
    model = randomised(tiny(), seed=2)
    engine = Engine(model, max_batch=1, max_len=32)
    worker = BatchWorker(engine)
    decoding, release = threading.Event(), threading.Event()
    step = engine.step

    def step_when_released():  # holds the first decode step until close() has been called
        decoding.set()
        release.wait(timeout=30)
        return step()

    engine.step = step_when_released

    async def last_event(job: Job) -> tuple:
        while True:
            event = await asyncio.wait_for(job.events.get(), timeout=5)
            if event[0] in ("done", "error"):
                return event

    async def scenario() -> list[tuple]:
        def job():  # 20 new tokens and no stop ids: far from done after one step
            return Job([5, 6, 7], SamplingParams(20, temperature=0), (), asyncio.get_running_loop())

        in_flight, waiting = job(), job()
        worker.submit(in_flight)
        assert await asyncio.to_thread(decoding.wait, 30)
        worker.submit(waiting)  # the only row is taken
        threading.Timer(0.2, release.set).start()  # the step ends after close() has asked to stop
        await asyncio.to_thread(worker.close)
        late = job()
        worker.submit(late)
        return [await last_event(j) for j in (in_flight, waiting, late)]

    try:
        events = asyncio.run(scenario())
    finally:
        release.set()
        worker.close()
    assert [e[0] for e in events] == ["error"] * 3 and all("worker has stopped" in e[1] for e in events)


def test_non_streaming_request_is_cancelled_when_its_client_disconnects(model_tok):
    """A client that leaves while its completion is generated: the handler stops waiting, cancels
    the job (its row is freed) and answers 499, instead of decoding the whole answer for nobody."""
    from starlette.requests import Request as HTTPRequest

    model, tok = model_tok
    app = create_app(model, tok, NAME, ServeLimits(max_batch=2, max_context=64, max_tokens=32))
    worker = app.state.worker
    endpoint = next(r.endpoint for r in app.routes if getattr(r, "path", None) == "/v1/completions")
    body = json.dumps({"model": NAME, "prompt": "Alice", "max_tokens": 32, "temperature": 0}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():  # the body, then the client is gone
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "query_string": b""}

    async def scenario():
        response = await endpoint(HTTPRequest(scope, receive))
        for _ in range(300):  # the worker drops the cancelled job at its next step
            if not worker.engine.active and not worker.jobs:
                break
            await asyncio.sleep(0.01)
        return response

    loop = asyncio.new_event_loop()
    try:
        response = loop.run_until_complete(scenario())
    finally:
        worker.close()  # before the loop closes: the worker emits events into it
        loop.close()
    assert response.status_code == 499
    assert not worker.engine.active and not worker.jobs
