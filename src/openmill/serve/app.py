"""OpenAI-compatible HTTP API over one model folder: /v1/models, /v1/completions,
/v1/chat/completions (streaming as server-sent events ending with `data: [DONE]`), /health.

Errors use OpenAI's body, {"error": {"message", "type", "param", "code"}}, with its statuses:
400 bad request (malformed JSON, a bad field, a prompt over the context), 401 wrong API key,
404 unknown model. Every request goes to the BatchWorker, which batches concurrent ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request  # the `serve` extra; FastAPI resolves handler annotations from module globals
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2.exceptions import TemplateError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from openmill.export.folder import ExportError
from openmill.generate import Engine, SamplingParams
from openmill.serve.worker import BatchWorker, Job
from openmill.textmodel import TextTokenizer

# How often a non-streaming request checks that its client is still there while it waits for the
# next token (a streaming response learns it from Starlette, which closes the event generator).
DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class ServeLimits:
    max_batch: int = 8  # rows decoded together
    max_context: int = 2048  # prompt + completion tokens per request (the KV cache's length)
    max_tokens: int = 1024  # largest max_tokens a request may ask for
    default_max_tokens: int = 256


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, logit_bias, ...)
    model: str
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)  # 0 keeps only the most likely token (greedy)
    top_k: int | None = Field(None, gt=0)  # extension (vLLM's name)
    repetition_penalty: float = Field(1.0, gt=0)  # extension
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # what torch.Generator.manual_seed takes (int64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=1)


class CompletionRequest(_Request):
    # OpenAI's shapes: text, token ids, or a batch of either (this server takes one prompt per request)
    prompt: str | list[int] | list[str] | list[list[int]]


class ContentPart(BaseModel):
    """One part of a message's content; only {"type": "text", "text": ...} is accepted."""

    model_config = ConfigDict(extra="ignore")  # image_url, input_audio, ... are refused by their type
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)


def create_app(model, tokenizer: TextTokenizer, name: str, limits: ServeLimits = ServeLimits(), api_key: str | None = None):
    engine = Engine(model, max_batch=limits.max_batch, max_len=limits.max_context, decode=tokenizer.decode)
    worker = BatchWorker(engine)
    context = engine.max_len
    # Token ids a prompt may hold: known to the tokenizer and inside the model's embedding.
    vocab_size = min(tokenizer.vocab_size, model.cfg.vocab_size)
    expected_authorization = f"Bearer {api_key}".encode()

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        worker.close()

    app = FastAPI(title="openmill", version="1", lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        # Constant time: how long a wrong key takes to refuse must not tell how much of it matched.
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected_authorization):
            raise APIError(401, "invalid API key", "authentication_error", code="invalid_api_key")

    async def parse(request: Request, kind: type[_Request]) -> _Request:
        check_api_key(request)
        try:
            data = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        try:
            req = kind.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(p) for p in err["loc"])
            raise APIError(400, f"{param}: {err['msg']}", param=param) from None
        if req.model != name:
            raise APIError(404, f"the model {req.model!r} does not exist (this server has {name!r})", param="model", code="model_not_found")
        return req

    def sampling(req: _Request, n_prompt: int, prompt_param: str) -> SamplingParams:
        """prompt_param: the request field the prompt came from ("prompt" or "messages"), for errors."""
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if asked is not None and asked > limits.max_tokens:
            raise APIError(400, f"max_tokens: {asked} is over this server's limit of {limits.max_tokens}", param="max_tokens")
        if n_prompt == 0:  # an empty prompt for a model that starts documents with no BOS
            message = f"{prompt_param}: the prompt is empty; give at least one character of text"
            raise APIError(400, message, param=prompt_param)
        if n_prompt >= context:
            raise APIError(
                400,
                f"the prompt has {n_prompt} tokens; this model's context is {context}",
                param=prompt_param,
                code="context_length_exceeded",
            )
        room = context - n_prompt
        max_new = min(asked if asked is not None else limits.default_max_tokens, room)
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        seed = req.seed if req.seed is not None else uuid.uuid4().int % 2**31
        return SamplingParams(max_new, req.temperature, req.top_k, req.top_p, req.repetition_penalty, seed, stop)

    def usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def next_event(job: Job, request: Request | None) -> tuple | None:
        """The job's next event, or None once `request`'s client has disconnected."""
        if request is None:
            return await job.events.get()
        while not await request.is_disconnected():
            try:
                return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                pass
        return None

    async def run(job: Job, request: Request | None):
        """Yield the job's events until it is done; cancel it if the client disconnects.
        request: the client to watch, for a non-streaming response (None for a streaming one,
        whose generator Starlette closes when its client goes, which runs the `finally`)."""
        worker.submit(job)
        try:
            while True:
                event = await next_event(job, request)
                if event is None:
                    return
                yield event
                if event[0] in ("done", "error"):
                    return
        finally:
            job.cancelled = True  # no-op once done

    async def respond(req: _Request, prompt: list[int], request: Request, chat: bool):
        params = sampling(req, len(prompt), "messages" if chat else "prompt")
        job = Job(prompt, params, tokenizer.stop_ids, asyncio.get_running_loop())
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "created": created, "model": name}
        if not req.stream:
            text, done = [], None
            async for event in run(job, request):
                if event[0] == "delta":
                    text.append(event[1])
                elif event[0] == "error":
                    raise APIError(500, event[1], "server_error")
                else:
                    done = event
            if done is None:  # the client went away: the job is cancelled, nobody reads this
                return Response(status_code=499)  # nginx's "client closed request"
            _, reason, n_prompt, n_out = done
            choice = {"index": 0, "finish_reason": reason}
            if chat:
                choice["message"] = {"role": "assistant", "content": "".join(text)}
            else:
                choice.update(text="".join(text), logprobs=None)
            obj = "chat.completion" if chat else "text_completion"
            return JSONResponse({**head, "object": obj, "choices": [choice], "usage": usage(n_prompt, n_out)})

        include_usage = bool((req.stream_options or {}).get("include_usage"))
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, reason: str | None, role: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
            body = {**head, "object": obj, "choices": [choice]}
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def events():
            if chat:
                yield chunk(None, None, role=True)
            async for event in run(job, None):
                if event[0] == "delta":
                    yield chunk(event[1], None)
                elif event[0] == "error":
                    yield f"data: {json.dumps(APIError(500, event[1], 'server_error').body())}\n\n"
                    break
                else:
                    _, reason, n_prompt, n_out = event
                    yield chunk(None, reason)
                    if include_usage:
                        yield f"data: {json.dumps({**head, 'object': obj, 'choices': [], 'usage': usage(n_prompt, n_out)})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "active": len(engine.active), "waiting": worker.waiting.qsize()}

    @app.get("/v1/models")
    async def models(request: Request):
        check_api_key(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "openmill"}]}

    def prompt_ids(prompt: str | list[int] | list[str] | list[list[int]]) -> list[int]:
        """The token ids of a completion prompt: text is encoded after the document prefix; token
        ids are taken as given (the client chose every token, as OpenAI and vLLM do)."""
        if prompt and isinstance(prompt, list) and not isinstance(prompt[0], int):  # a batch of prompts
            if len(prompt) != 1:
                message = f"prompt: give one prompt per request (a string or a list of token ids), not {len(prompt)}"
                raise APIError(400, message, param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return tokenizer.document_prefix() + tokenizer.encode(prompt)
        for i, token in enumerate(prompt):
            if not 0 <= token < vocab_size:
                where = f"token id {token} (position {i})"
                message = f"prompt: {where} is outside this model's vocabulary ({vocab_size} ids)"
                raise APIError(400, message, param="prompt")
        return prompt

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        return await respond(req, prompt_ids(req.prompt), request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, ChatRequest)
        messages = [template_message(m, f"messages.{i}") for i, m in enumerate(req.messages)]
        try:
            ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
        except (ValueError, TemplateError) as e:  # ExportError (no chat template) is a ValueError
            raise APIError(400, f"messages: {chat_template_refusal(e)}", param="messages") from None
        return await respond(req, ids, request, chat=True)

    return app


def template_message(message: Message, param: str) -> dict:
    """A message as chat templates take it: content one string, and "developer" (OpenAI's name for
    system instructions with its newer models) as "system", the role templates know.
    param: where the message is in the request (messages.N), for errors."""
    content = message.content
    if not isinstance(content, str):
        for j, part in enumerate(content):
            if part.type != "text":
                where = f"{param}.content.{j}.type"
                message = f"{where}: {part.type!r} content is not supported; this model takes only text parts"
                raise APIError(400, message, param=where)
            if part.text is None:
                where = f"{param}.content.{j}.text"
                raise APIError(400, f"{where}: a text part needs its text", param=where)
        # Concatenated with nothing added between parts: a client that wants a separator sends one.
        content = "".join(part.text for part in content)
    return {"role": "system" if message.role == "developer" else message.role, "content": content}


def chat_template_refusal(e: Exception) -> str:
    """What a client should do when the model's chat template cannot take its conversation."""
    if isinstance(e, ExportError):  # raised before rendering: the folder has no template at all
        return "this model has no chat template; send plain text to /v1/completions instead"
    return f"this model's chat template refused the conversation: {e} (check the roles and their order)"


def serve(folder, host: str, port: int, name: str | None, limits: ServeLimits, api_key: str | None, quantize: str | None = None):
    """Load the model folder and serve it with uvicorn until interrupted."""
    import uvicorn

    from openmill.generate.quantize import quantize_model
    from openmill.textmodel import load_text_model

    model, tokenizer = load_text_model(folder)
    if quantize:
        quantize_model(model, quantize)
    else:
        model.pack_weights()
    app = create_app(model, tokenizer, name or folder.name, limits, api_key)
    uvicorn.run(app, host=host, port=port, log_level="info")
