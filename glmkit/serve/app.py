"""The HTTP server: FastAPI routes over one `EngineLoop` (OpenAI's API; see docs/serve.md).

    server = Server(engine, tokenizer, ServeConfig(model_name="glm", fmt="glm4", causal=False))
    app = create_app(server)            # uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: POST /v1/chat/completions (`glmkit.serve.chat`), POST /v1/completions
(`glmkit.serve.completions`), GET /v1/models, GET /health, GET /metrics (Prometheus text).
Every error is OpenAI's body `{"error": {"message", "type", "param", "code"}}`: a malformed body or
a bad field 400 (with the field as `param`), a missing or wrong API key 401, an unknown model 404, a
prompt too long for the context or a `max_tokens` over the limit 400 (with the numbers), a full queue
429 with `Retry-After`, anything unexpected 500. A streamed response that fails after it started
sends an error event instead of `data: [DONE]`. Streams send a `: keep-alive` comment after
`keepalive_s` seconds without output. A client that goes away (stream closed, or a waiting
non-streamed request disconnected) has its generation cancelled; its KV rows are freed at the
engine's next step.

No lock is held around generation: handlers only enqueue into the engine and await their queues.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from glmkit.errors import GlmkitError
from glmkit.infer.engine import Engine
from glmkit.serve import chat, completions
from glmkit.serve.engine_loop import EngineLoop, QueueFull, Submission
from glmkit.serve.protocol import (
    APIError,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ChunkChoice,
    CompletionRequest,
    FunctionCall,
    ModelCard,
    ModelList,
    ToolCall,
    Usage,
    new_id,
    now,
)


@dataclass
class ServeConfig:
    model_name: str
    fmt: str = "glm4"                  # chat format (the parser's dialect): glm4 | glm45
    template: str | None = None        # the checkpoint's own Jinja chat template, when it is used
    causal: bool = False               # the model reads left to right (CLM-trained, HF): chat as causal text
    api_key: str | None = None
    max_waiting: int = 64              # requests waiting for a KV row beyond the running ones; more -> 429
    max_tokens: int = 4096             # the most tokens one request may ask for
    keepalive_s: float = 15.0
    retry_after_s: int = 1
    # tests: prompt ids -> an extra logits processor for that request (forces a model's output)
    processor_hook: Callable | None = None
    tools: object | None = None        # glmkit.serve.tools.ServerTools: built-in tools run on the server


class Server:
    def __init__(self, engine: Engine, tokenizer, config: ServeConfig):
        self.engine, self.tok, self.config = engine, tokenizer, config
        self.loop = EngineLoop(engine, config.max_waiting)
        self.metrics = self.loop.metrics
        self.table = engine.table.table
        self.created = now()

    @property
    def context(self) -> int:
        return self.engine.max_len

    def check_model(self, name: str) -> None:
        if name != self.config.model_name:
            raise APIError(404, f"the model {name!r} does not exist here; this server serves "
                           f"{self.config.model_name!r} (GET /v1/models)", "model", "model_not_found")

    def budget(self, prompt_tokens: int, asked: int | None, param: str) -> int:
        """max_tokens for a prompt: as asked, or what the context leaves (capped by the server's limit)."""
        room = self.context - prompt_tokens
        if room < 1:
            raise APIError(400, f"the prompt is {prompt_tokens} tokens, but this model's context holds "
                           f"{self.context} tokens including the reply; shorten the {param}",
                           param, "context_length_exceeded")
        if asked is None:
            return min(room, self.config.max_tokens)
        if asked > self.config.max_tokens:
            raise APIError(400, f"max_tokens = {asked} is over this server's limit of {self.config.max_tokens}",
                           "max_tokens", "invalid_value")
        if asked > room:
            raise APIError(400, f"the prompt is {prompt_tokens} tokens and max_tokens is {asked}: "
                           f"{prompt_tokens + asked} > this model's context of {self.context} tokens; lower "
                           f"max_tokens to {room} or shorten the {param}", param, "context_length_exceeded")
        return asked

    def submit(self, request, n: int, into: Submission | None = None) -> Submission:
        try:
            return self.loop.submit(request, n, into)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry in a moment", None, "queue_full",
                           {"Retry-After": str(self.config.retry_after_s)}) from None
        except GlmkitError as e:
            raise APIError(400, str(e)) from None

    def hook(self, prompt: list[int]):
        return self.config.processor_hook(prompt) if self.config.processor_hook else None

    async def outputs(self, sub: Submission, index: dict[int, int], choices: list,
                      request: HTTPRequest | None = None) -> AsyncIterator[tuple[int, object]]:
        """(choice index, output) in order; (-1, None) after keepalive_s quiet seconds. A choice that
        ends early (a stop string, a second call) has its generation cancelled; so has everything
        still running when the consumer stops (a closed stream) or the client disconnects."""
        try:
            while sub.open:
                o = await sub.get(self.config.keepalive_s)
                if o is None:
                    if request is not None and await request.is_disconnected():
                        return
                    yield -1, None
                    continue
                i = index[o.request]
                yield i, o
                if choices[i].finish is not None and o.request in sub.open:
                    self.loop.cancel(sub, o.request)
                    sub.open.discard(o.request)
        finally:
            if sub.open:
                self.loop.cancel(sub)


    async def collect(self, sub: Submission, index: dict[int, int], choices: list, request: HTTPRequest):
        """`outputs` for a non-streamed response: no keep-alives; an engine failure is a 500 (answered
        by the route, so the connection stays open for the client's next request)."""
        try:
            async for i, o in self.outputs(sub, index, choices, request):
                if o is not None:
                    yield i, o
        except Exception as e:
            raise APIError(500, f"generation failed: {type(e).__name__}: {e}", None, "generation_failed") from e


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _sse(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Server-sent events; an exception after the stream began becomes an error event."""
    try:
        async for e in events:
            yield e
    except Exception as e:                         # the headers are sent: tell the client in the stream
        body = APIError(500, f"generation failed: {type(e).__name__}: {e}", code="generation_failed").body()
        yield f"data: {json.dumps(body)}\n\n"


async def _tool_chunks(cid: str, created: int, model: str, events, include_usage: bool) -> AsyncIterator[str]:
    """The SSE events of a chat completion with server-side tools (`glmkit.serve.tools.tool_rounds`)."""
    def event(choices: list, usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(id=cid, created=created, model=model, choices=choices, usage=usage)
        return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"

    yield event([ChunkChoice(index=0, delta={"role": "assistant", "content": ""})])
    async for kind, x in events:
        if kind == "keepalive":
            yield ": keep-alive\n\n"
        elif kind == "delta":
            yield event([ChunkChoice(index=0, delta=x)])
        else:
            finish, prompt_tokens, done = x
            yield event([ChunkChoice(index=0, delta={}, finish_reason=finish)])
            if include_usage:
                yield event([], Usage(prompt_tokens=prompt_tokens, completion_tokens=done,
                                      total_tokens=prompt_tokens + done))
    yield "data: [DONE]\n\n"


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        server.loop.start()
        yield
        server.loop.stop()
        if server.config.tools is not None:
            server.config.tools.close()

    app = FastAPI(title="glmkit serve", lifespan=lifespan)
    cfg, tok = server.config, server.tok

    def authorized(request: HTTPRequest) -> None:
        if cfg.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if got != f"Bearer {cfg.api_key}":
            why = "no API key was given" if not got else "the API key is wrong"
            raise APIError(401, f"{why}; send the server's key as 'Authorization: Bearer KEY' "
                           "(OpenAI(api_key=KEY))", None, "invalid_api_key")

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, e: APIError):
        server.metrics.http_done(request.url.path, e.status)
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: HTTPRequest, e: RequestValidationError):
        first = e.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            msg = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))})"
        else:
            msg = f"{param or 'body'}: {first.get('msg')}"
        return await api_error(request, APIError(400, msg, param, "invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, e: StarletteHTTPException):
        return await api_error(request, APIError(e.status_code, str(e.detail), None, None))

    @app.exception_handler(Exception)
    async def internal(request: HTTPRequest, e: Exception):
        return await api_error(request, APIError(500, f"internal error: {type(e).__name__}: {e}", None, "internal_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": cfg.model_name, "in_flight": server.loop.in_flight}

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def metrics():
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        server.metrics.http_done("/v1/models", 200)
        return ModelList(data=[ModelCard(id=cfg.model_name, created=server.created)])

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: HTTPRequest):
        server.check_model(body.model)
        if cfg.tools is not None:
            return await with_server_tools(body, request)
        plan = chat.plan_chat(body, cfg.fmt, tok, server.table, cfg.template)
        max_tokens = server.budget(len(plan.prompt), body.max_completion_tokens or body.max_tokens, "messages")
        ereq = chat.engine_request(plan, body, max_tokens, cfg.causal, server.hook(plan.prompt))
        sub = server.submit(ereq, body.n)
        choices = chat.choices_for(plan, body, cfg.fmt, tok, body.n)
        index = {rid: i for i, rid in enumerate(sub.rids)}
        cid, created = new_id("chatcmpl"), now()
        server.metrics.http_done("/v1/chat/completions", 200)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            events = chat.chunks(cid, created, cfg.model_name, len(plan.prompt), choices,
                                 server.outputs(sub, index, choices), usage)
            return StreamingResponse(_sse(events), media_type="text/event-stream")
        async for i, o in server.collect(sub, index, choices, request):
            choices[i].feed(o)
        if any(c.finish is None for c in choices):       # the client went away
            return JSONResponse({}, status_code=499)
        return chat.completion(cid, created, cfg.model_name, len(plan.prompt), choices)

    async def with_server_tools(body: ChatCompletionRequest, request: HTTPRequest):
        from glmkit.serve.tools import ServerTools, tool_rounds
        if body.n != 1:
            raise APIError(400, "n > 1 is not supported when the server runs tools (--tools)", "n")
        conversation = ServerTools.conversation(request.headers.get("x-conversation-id"), body.user)
        try:
            toolbox = await asyncio.to_thread(cfg.tools.get, conversation)
        except GlmkitError as e:
            raise APIError(500, f"the server's tools could not start: {e}", None, "tools_unavailable") from None
        events = tool_rounds(server, body, toolbox, None if body.stream else request)
        try:
            first = await anext(events)               # the first round's errors are HTTP errors
        except BaseException:
            cfg.tools.release(conversation)
            raise
        cid, created = new_id("chatcmpl"), now()
        server.metrics.http_done("/v1/chat/completions", 200)

        async def all_events():
            try:
                yield first
                async for e in events:
                    yield e
            finally:
                cfg.tools.release(conversation)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_sse(_tool_chunks(cid, created, cfg.model_name, all_events(), usage)),
                                     media_type="text/event-stream")
        content, reasoning, calls, end = [], [], {}, None
        try:
            async for kind, x in all_events():
                if kind == "delta":
                    content.append(x.get("content") or "")
                    reasoning.append(x.get("reasoning_content") or "")
                    for tc in x.get("tool_calls", []):
                        c = calls.setdefault(tc["index"], {"id": tc.get("id"), "name": tc["function"].get("name"),
                                                           "arguments": ""})
                        c["arguments"] += tc["function"]["arguments"]
                elif kind == "end":
                    end = x
        except APIError:
            raise
        except Exception as e:
            raise APIError(500, f"generation failed: {type(e).__name__}: {e}", None, "generation_failed") from e
        if end is None:
            return JSONResponse({}, status_code=499)
        finish, prompt_tokens, done = end
        tool_calls = [ToolCall(id=c["id"], function=FunctionCall(name=c["name"], arguments=c["arguments"]))
                      for _, c in sorted(calls.items())]
        message = ChatMessage(content="".join(content) or (None if tool_calls else ""),
                              reasoning_content="".join(reasoning) or None, tool_calls=tool_calls or None)
        return ChatCompletion(id=cid, created=created, model=cfg.model_name,
                              choices=[ChatChoice(index=0, message=message, finish_reason=finish)],
                              usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=done,
                                          total_tokens=prompt_tokens + done))

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def text_completions(body: CompletionRequest, request: HTTPRequest):
        server.check_model(body.model)
        planned = completions.plan_completion(body, tok, cfg.causal, cfg.max_tokens)
        for r, _ in planned:
            r.sampling.max_new_tokens = r.max_new_tokens = server.budget(len(r.prompt), body.max_tokens, "prompt")
        sub, choices, index = None, [], {}
        try:
            for r, c in planned:
                sub = server.submit(r, body.n, sub)
                for rid in sub.rids[len(index):]:
                    index[rid] = len(choices)
                    choices.append(completions.FillChoice(len(choices), c.prompt, c.has_blanks, logprobs=(
                        None if c.logprobs is None else {k2: [] for k2 in c.logprobs})))
        except APIError:
            if sub is not None:
                server.loop.cancel(sub)
            raise
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        echo = [prompts[k // body.n] if body.echo else None for k in range(len(choices))]
        cid, created = new_id("cmpl"), now()
        server.metrics.http_done("/v1/completions", 200)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            events = completions.chunks(cid, created, cfg.model_name, choices, sub.prompt_tokens, tok,
                                        server.outputs(sub, index, choices), usage)
            return StreamingResponse(_sse(events), media_type="text/event-stream")
        async for i, o in server.collect(sub, index, choices, request):
            choices[i].feed(o, tok)
        if any(c.finish is None for c in choices):
            return JSONResponse({}, status_code=499)
        return completions.completion(cid, created, cfg.model_name, choices, sub.prompt_tokens, tok, echo)

    return app
