"""`tunesmith serve`: an OpenAI-compatible HTTP API over a run's model (FastAPI + uvicorn).

Endpoints: POST /v1/chat/completions and /v1/completions (JSON or server-sent events with
"stream": true), GET /v1/models, POST /v1/feedback (rating and correction for a response id),
GET /health, GET /metrics (Prometheus). With an API key set, every call but /health and /metrics
needs "Authorization: Bearer KEY" and gets 401 otherwise. Like the UI, it answers only to the Host names it
was started for (421 otherwise) and refuses a web page's Origin unless named (403): a page elsewhere, or
one that rebound its name to 127.0.0.1, can neither chat nor post feedback. Errors use OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, with a message that says what to change.
Chat prompts are rendered with the run's own chat template, exactly as in training, tools block included; an
answer's calls are read by that template's parser and never passed off when a required call was not made.
Whatever one client sends, the server keeps answering the others: a bad request gets a 4xx naming
the field, a failure in one request's generation fails that request only, and waiting is bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request  # at module level, where FastAPI resolves the endpoints' annotations
from starlette.responses import JSONResponse, Response, StreamingResponse

from tunesmith.data.formats import Message, chat_messages
from tunesmith.data.tokenize import prompt_ids
from tunesmith.data.tools import ReasoningSplitter, split_reasoning
from tunesmith.deploy import guard, limits
from tunesmith.deploy.engine import Busy, Engine, Job, Result, Served, Stopped
from tunesmith.deploy.requestlog import CLIENT_GONE, RequestLog
from tunesmith.deploy.toolcalls import (
    AnswerSplitter,
    FieldError,
    ToolRequest,
    call_deltas,
    call_opening,
    enforcement_error,
    tool_request,
    wire_calls,
)
from tunesmith.errors import TunesmithError
from tunesmith.rundir import RunDir

if TYPE_CHECKING:
    from collections.abc import Iterable

    from fastapi.exceptions import RequestValidationError

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
MAX_MESSAGES = 512
MAX_STOPS = 16
MAX_STOP_CHARS = 256

logger = logging.getLogger("tunesmith.serve")


def _utf8(value: str) -> str:
    """JSON's \\ud800 escapes decode to lone surrogates, which the tokenizer and SQLite cannot take."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"has a lone surrogate at character {error.start}; send valid UTF-8 text") from None
    return value


Text = Annotated[str, AfterValidator(_utf8)]


class ChatMessage(BaseModel):
    """One message of the history; calls and results are read as training reads them (formats.chat_messages)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: Text | None = Field(default=None, description="Null only on an assistant message with tool_calls.")
    tool_calls: list[Any] | None = Field(default=None, description="An assistant message's calls, OpenAI's shape.")
    tool_call_id: Text | None = Field(default=None, description="A tool message: the id of the call it answers.")
    name: Text | None = None
    reasoning_content: Text | None = Field(default=None, description="An assistant message's reasoning.")


def _nothing(*harmless: Any) -> Callable[[Any], bool]:
    """True for a value that asks for nothing (False is not 0 here, nor True 1: `is` for bools)."""
    return lambda value: any(value is h if isinstance(h, bool) or h is None else value == h for h in harmless)


# OpenAI fields this server does not implement (tools and tool_choice: on /v1/completions; chat declares them):
# the values that ask for nothing are accepted (clients send some by default); any other is refused with a 400
# naming the field, never dropped, so a client asking for JSON mode learns it does not get it. Each with what to
# send instead.
NOT_IMPLEMENTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "logprobs": (_nothing(None, False), "false"),
    "top_logprobs": (_nothing(None, 0), "0"),
    "tools": (_nothing(None, []), "[]"),
    "tool_choice": (_nothing(None, "none", "auto"), '"none"'),
    "functions": (_nothing(None, []), "[]"),
    "function_call": (_nothing(None, "none", "auto"), '"none"'),
    "response_format": (_nothing(None, {"type": "text"}), '{"type": "text"}'),
    "logit_bias": (lambda value: value is None or (isinstance(value, dict) and not any(value.values())), "{}"),
    "presence_penalty": (_nothing(None, 0), "0"),
    "frequency_penalty": (_nothing(None, 0), "0"),
    "echo": (_nothing(None, False), "false"),
    "suffix": (_nothing(None, ""), "null"),
    "best_of": (_nothing(None, 1), "1"),
}


class StreamOptions(BaseModel):
    include_usage: bool = Field(default=False, description="End the stream with a chunk of usage, choices empty.")


class Sampling(BaseModel):
    # Unknown fields are kept, to be refused when they are OpenAI's and ask for something (NOT_IMPLEMENTED).
    model_config = ConfigDict(extra="allow")

    model: Text
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1, description="torch's seed range.")
    n: int = Field(default=1, ge=1, le=1, description="Only one choice per request is generated.")
    user: Text | None = None

    @field_validator("stop", mode="plain")
    @classmethod
    def _stops(cls, value: Any) -> list[str]:
        """One list of checked strings (checked here rather than as a union, so errors name just `stop`)."""
        stops = [value] if isinstance(value, str) else [] if value is None else value
        if not isinstance(stops, list) or not all(isinstance(text, str) for text in stops):
            raise ValueError("stop must be a string or a list of strings")
        if len(stops) > MAX_STOPS:
            raise ValueError(f"{len(stops)} stop strings; send at most {MAX_STOPS}")
        for text in stops:
            if not text or len(text) > MAX_STOP_CHARS:
                # An empty one would match at once; a long one holds back that much streamed text.
                raise ValueError(f"each stop string needs 1 to {MAX_STOP_CHARS} characters, not {len(text)}")
            _utf8(text)
        return stops

    def check_implemented(self) -> None:
        for name, value in (self.model_extra or {}).items():
            if name in NOT_IMPLEMENTED and not NOT_IMPLEMENTED[name][0](value):
                raise ApiError(
                    400,
                    f"This server does not implement '{name}'; leave it out (or send {NOT_IMPLEMENTED[name][1]}) "
                    "rather than have it ignored.",
                    name,
                )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # Checked into a toolcalls.ToolRequest by chat(), whose errors name the tool and the fix.
    tools: Any = Field(default=None, description="OpenAI function tools the model may call.")
    tool_choice: Any = Field(default=None, description='"none", "auto", "required" or a named function.')


class CompletionRequest(Sampling):
    prompt: Text


class FeedbackRequest(BaseModel):
    """Sizes are checked in check_feedback (in UTF-8 bytes, and as a 400 naming the field)."""

    id: Text = Field(description="The id of a response returned by this server (chatcmpl-... or cmpl-...).")
    rating: float | None = Field(default=None, ge=-1.0, le=5.0, allow_inf_nan=False)
    correction: Text | None = None
    comment: Text | None = None


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def error_body(
    status: int, message: str, param: str | None, kind: str, headers: dict[str, str] | None = None
) -> Response:
    content = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(status_code=status, content=content, headers=headers)


class Guard:
    """ASGI middleware in front of every route, before FastAPI reads a byte: the API key, a busy server's
    refusal (`refuse` gives the response to send instead of reading a POST to that path, or None), the body size.

    The key is checked on scope["path"], the path the router dispatches on, never on request.url: that one
    is rebuilt from the Host header, which a client can bend to look like a public path.
    """

    def __init__(
        self,
        app: Any,
        api_key: str | None,
        public: frozenset[str],
        max_body_bytes: int,
        refuse: Callable[[str], Response | None],
    ) -> None:
        self.app, self.api_key, self.public, self.max_body_bytes = app, api_key, public, max_body_bytes
        self.refuse = refuse

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.api_key and scope["path"] not in self.public:
            given = headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token.encode(), self.api_key.encode()):
                message = "Missing or wrong API key: send 'Authorization: Bearer <key>'."
                await error_body(401, message, None, "authentication_error")(scope, receive, send)
                return
        if scope["method"] == "POST" and (refusal := self.refuse(scope["path"])) is not None:
            await refusal(scope, receive, send)
            return
        body = await guard.read_body(scope, receive, self.max_body_bytes)
        if body is guard.TOO_LARGE:
            await self._too_large(scope, receive, send)
        elif body is not guard.GONE:
            await self.app(scope, guard.replay(body, receive), send)

    async def _too_large(self, scope: dict, receive: Any, send: Any) -> None:
        message = (
            f"The request body is over this server's limit of {self.max_body_bytes} bytes; send less "
            "(or start the server with a larger --max-body-bytes)."
        )
        # Close the connection: reading the rest of an oversized body would be the cost we refuse.
        response = error_body(413, message, None, "invalid_request_error", {"Connection": "close"})
        await response(scope, receive, send)


class Callers:
    """ASGI middleware outside every other: the Host must be a name this server was started for (--allow-host),
    and a browser's Origin this server's own page or one named with --cors-origin. Requests without an Origin
    (curl, the OpenAI clients) pass; a page elsewhere, or one whose name was rebound to 127.0.0.1, never reaches
    the API, key or no key.
    """

    def __init__(self, app: Any, hosts: frozenset[str], origins: frozenset[str]) -> None:
        self.app, self.hosts, self.origins = app, hosts, origins

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host, origin = headers.get("host", ""), headers.get("origin")
        if not guard.host_allowed(host, self.hosts):
            message = (
                f"Host {host!r} is not a name this server answers to. To reach it under that name, start it with "
                f"--allow-host {guard.host_name(host) or 'NAME'}."
            )
            await error_body(421, message, None, "invalid_request_error")(scope, receive, send)
        elif origin is not None and not guard.origin_allowed(origin, host, self.origins):
            message = (
                f"Requests from the web page at {origin!r} are refused. To let that page use this API, start the "
                f"server with --cors-origin {origin}."
            )
            await error_body(403, message, None, "permission_error")(scope, receive, send)
        else:
            await self.app(scope, receive, send)


class Metrics:
    """Prometheus series for one server (own registry, so several servers in one process do not clash)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        labels = ("endpoint", "model")
        self.requests = Counter("tunesmith_requests", "Requests answered", (*labels, "status"), registry=self.registry)
        self.errors = Counter(
            "tunesmith_request_errors", "Requests answered with an error", (*labels, "status"), registry=self.registry
        )
        self.latency = Histogram(
            "tunesmith_request_latency_seconds",
            "Time from request to last token",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_token = Histogram(
            "tunesmith_time_to_first_token_seconds",
            "Time from request to first generated token",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "tunesmith_prompt_tokens", "Prompt tokens processed", labels, registry=self.registry
        )
        self.generated_tokens = Counter(
            "tunesmith_generated_tokens", "Tokens generated", labels, registry=self.registry
        )
        self.queue = Gauge("tunesmith_queue_depth", "Requests waiting for the model", registry=self.registry)
        self.queue_peak = Gauge(
            "tunesmith_queue_depth_peak", "Most requests waiting at once since the start", registry=self.registry
        )
        self.busy = Counter(
            "tunesmith_busy_refusals", "Requests refused with 503 because the waiting list was full", ("endpoint",),
            registry=self.registry,
        )  # fmt: skip
        self.log_errors = Counter(
            "tunesmith_request_log_errors", "Requests answered but not written to the request log",
            registry=self.registry,
        )  # fmt: skip
        self.batch = Histogram(
            "tunesmith_batch_size", "Rows (requests) in each generation step of the running batch",
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry,
        )  # fmt: skip


ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


@dataclass
class ServerState:
    """What every route of one server shares: the engine, the request log and its writer, the metrics, the limits."""

    engine: Engine
    log: RequestLog
    metrics: Metrics
    max_tokens_limit: int
    default_max_tokens: int
    # One writer thread: SQLite writes are serialised anyway, and a locked database must not stall the event loop.
    log_writer: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="tunesmith-log")
    )

    def busy_error(self, endpoint: str, retry_after: int) -> ApiError:
        self.metrics.busy.labels(endpoint).inc()
        return ApiError(
            503,
            f"The server is busy ({self.engine.queue_size} requests waiting); retry in {retry_after} s.",
            None,
            "server_busy",
            {"Retry-After": str(retry_after)},
        )

    def refuse(self, path: str) -> Response | None:
        """While the waiting list is full, refuse a generation before its body is read and tokenized: under a
        storm of retries, refusals should cost next to nothing, so the CPU (and the GIL) stays with generation."""
        if path not in ENDPOINTS or self.engine.waiting < self.engine.queue_size:
            return None
        error = self.busy_error(ENDPOINTS[path], self.engine.retry_after())
        return error_body(error.status, error.message, error.param, error.kind, error.headers)

    def served(self, name: str) -> Served:
        if name not in self.engine.models:
            raise ApiError(
                404,
                f"Model '{name}' is not served here; available: {', '.join(self.engine.models)}.",
                "model",
                "not_found_error",
            )
        return self.engine.models[name]

    def limit_tokens(self, requested: int | None) -> int:
        tokens = requested or self.default_max_tokens
        if tokens > self.max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens {tokens} is over this server's limit of {self.max_tokens_limit}; ask for fewer.",
                "max_tokens",
            )
        return tokens

    def submit(self, job: Job, endpoint: str) -> None:
        try:
            self.engine.submit(job)
        except Busy as busy:  # filled up while this one was read and tokenized
            raise self.busy_error(endpoint, busy.retry_after) from None
        except Stopped:
            raise ApiError(
                503, "The generation worker has stopped; restart the server (its log says why).", None, "server_error"
            ) from None
        self.metrics.queue.set(self.engine.waiting)

    def save(self, row: dict) -> None:
        """Write one request-log row; a failure is counted and logged, never passed to the client."""
        try:
            self.log.record(**row)
        except Exception as error:  # whatever it is (locked, disk full, a bad value), the answer goes out
            self.metrics.log_errors.inc()
            logger.error("Could not write request %s to the request log %s: %s", row["id"], self.log.path, error)

    async def saved(self, row: dict) -> None:
        await asyncio.get_running_loop().run_in_executor(self.log_writer, self.save, row)

    async def logged(self, call: Callable[[], Any]) -> Any:
        """A read or feedback write on the request log, answered 503 while the log cannot be used."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.log_writer, call)
        except (sqlite3.Error, OSError) as error:
            logger.error("The request log %s failed: %s", self.log.path, error)
            raise ApiError(
                503, "The request log is unavailable; retry shortly.", None, "server_error", {"Retry-After": "5"}
            ) from None


def create_app(
    engine: Engine,
    log: RequestLog,
    api_key: str | None = None,
    max_tokens_limit: int = limits.MAX_TOKENS_LIMIT,
    default_max_tokens: int = limits.DEFAULT_MAX_TOKENS,
    max_body_bytes: int = limits.MAX_BODY_BYTES,
    docs: bool = False,
    hosts: frozenset[str] | None = None,
    cors_origins: Iterable[str] = (),
) -> Any:
    """hosts: the Host names answered (guard.allowed_hosts; default: loopback only); cors_origins: the web pages
    (scheme://name[:port]) allowed to call the API from a browser, answered with CORS headers."""
    from fastapi import FastAPI
    from starlette.middleware.cors import CORSMiddleware

    if max_tokens_limit > engine.max_tokens_limit:  # each row's slot of the KV cache holds no longer answer
        raise TunesmithError(
            f"max_tokens_limit {max_tokens_limit} is over the {engine.max_tokens_limit} the engine was loaded for; "
            "load it with max_tokens_limit at least as large."
        )
    app = FastAPI(
        title="tunesmith",
        description="OpenAI-compatible API over fine-tuned models.",
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    state = ServerState(engine, log, Metrics(), max_tokens_limit, default_max_tokens)
    app.state.server = state
    app.state.engine, app.state.log, app.state.metrics = engine, log, state.metrics
    engine.on_batch = state.metrics.batch.observe
    public = frozenset({"/health", "/metrics", *(DOCS_PATHS if docs else ())})
    app.add_middleware(Guard, api_key=api_key, public=public, max_body_bytes=max_body_bytes, refuse=state.refuse)
    origins = frozenset(guard.as_origin(origin) for origin in cors_origins)
    if origins:  # outside Guard: a preflight carries no key, and 401/413/503 answers must be readable by the page
        app.add_middleware(
            CORSMiddleware, allow_origins=sorted(origins), allow_methods=["GET", "POST"], allow_headers=["*"],
            expose_headers=["Retry-After"], max_age=600,
        )  # fmt: skip
    app.add_middleware(Callers, hosts=hosts or guard.allowed_hosts("127.0.0.1"), origins=origins)
    register_error_handlers(app)
    register_routes(app)
    return app


def register_error_handlers(app: Any) -> None:
    from fastapi.exceptions import RequestValidationError

    app.exception_handler(ApiError)(api_error)
    app.exception_handler(RequestValidationError)(invalid_request)
    app.exception_handler(HTTPException)(http_error)
    app.exception_handler(Exception)(unexpected_error)


def register_routes(app: Any) -> None:
    app.post("/v1/chat/completions")(chat)
    app.post("/v1/completions")(completions)
    app.get("/v1/models")(models)
    app.post("/v1/feedback")(feedback)
    app.get("/health")(health)
    app.get("/metrics")(prometheus)


async def api_error(request: Request, exc: ApiError) -> Response:
    return error_body(exc.status, exc.message, exc.param, exc.kind, exc.headers)


async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        message = f"The request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})."
        return error_body(400, message, None, "invalid_request_error")
    where = ".".join(str(part) for part in first.get("loc", ())[1:])
    if not where:
        message = "The request body must be a JSON object sent with 'Content-Type: application/json'."
        return error_body(400, message, None, "invalid_request_error")
    return error_body(400, f"Field '{where}': {first.get('msg')}.", where, "invalid_request_error")


async def http_error(request: Request, exc: HTTPException) -> Response:
    messages = {
        400: "The request body could not be read as JSON; send UTF-8 JSON with 'Content-Type: application/json'.",
        404: f"No endpoint at {request.scope['path']}; the API is under /v1 (chat/completions, completions, "
        "models, feedback).",
        405: f"{request.method} is not allowed on {request.scope['path']}.",
    }
    message = messages.get(exc.status_code, str(exc.detail))
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_body(exc.status_code, message, None, kind, exc.headers)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    # The traceback goes to the server's log; the client learns nothing of the server's insides.
    return error_body(500, "Internal server error; the server's log has the details.", None, "server_error")


def server_state(request: Request) -> ServerState:
    """The routes are module-level, shared by every app in the process; each request finds its own server here."""
    return request.app.state.server


def check_chat(body: ChatRequest) -> None:
    if not body.messages:
        raise ApiError(400, "messages is empty: send at least one message with role 'user'.", "messages")
    if body.messages[-1].role == "assistant":
        raise ApiError(
            400, "The last message is the assistant's; end with a user message to get an answer.", "messages"
        )


def check_completion(body: CompletionRequest) -> None:
    if not body.prompt:
        raise ApiError(400, "prompt is empty.", "prompt")


def check_feedback(body: FeedbackRequest) -> None:
    if body.rating is None and body.correction is None:
        raise ApiError(400, "Send a rating, a correction, or both.", "rating")
    for name, text, limit in (
        ("correction", body.correction, limits.MAX_CORRECTION_BYTES),
        ("comment", body.comment, limits.MAX_COMMENT_BYTES),
    ):
        if text is not None and len(text.encode()) > limit:
            raise ApiError(
                400, f"The {name} is {len(text.encode())} bytes; this server takes at most {limit} bytes.", name
            )


def check_prompt_length(engine: Engine, endpoint: str, ids: list[int], max_tokens: int) -> None:
    if len(ids) > engine.max_prompt_tokens:
        raise ApiError(
            400,
            f"The prompt is {len(ids)} tokens; this server takes at most {engine.max_prompt_tokens} (the length "
            "the run was trained on, unless --max-prompt-tokens says otherwise). Shorten the prompt.",
            "messages" if endpoint == "chat" else "prompt",
        )
    if len(ids) + max_tokens > engine.context_limit:
        raise ApiError(
            400,
            f"The prompt is {len(ids)} tokens; with max_tokens {max_tokens} it exceeds the context of "
            f"{engine.context_limit}. Shorten the prompt or lower max_tokens.",
            "max_tokens",
        )


async def tokenize(encode: Callable[[], list[int]], param: str) -> list[int]:
    """Render and tokenize in a thread: a long prompt must not hold up /health and the other requests."""
    from jinja2 import TemplateError

    try:
        return await asyncio.to_thread(encode)
    except TemplateError as error:  # the run's template refuses this conversation (e.g. roles out of order)
        raise ApiError(400, f"The chat template cannot render these messages: {error}", param) from None


def history(body: ChatRequest) -> tuple[Message, ...]:
    """The request's messages as training reads a conversation: calls' arguments decoded once, results kept."""
    try:
        return tuple(chat_messages([m.model_dump(exclude_none=True) for m in body.messages]))
    except ValueError as error:
        raise ApiError(400, f"{error}.", "messages") from None


def tools_asked(body: ChatRequest, model: Served) -> ToolRequest:
    """The request's tools and tool_choice, checked against what the served template can render."""
    try:
        asked = tool_request(body.tools, body.tool_choice)
    except FieldError as error:
        raise ApiError(400, str(error), error.param) from None
    if asked.rendered_tools and model.tool_format is None:
        raise ApiError(
            400,
            f"Model '{model.name}' cannot take tools: its run's chat template renders no tools block (the run was "
            "trained without tool data). Serve a run trained on data with tools (tunesmith gives its template a tools "
            'block), or leave out tools (or send tool_choice "none").',
            "tools",
        )
    return asked


def forced_opening(model: Served, asked: ToolRequest) -> str:
    """The start every answer to a required or named tool_choice is given: the template's call opening, so the
    model can only go on with a call."""
    if not asked.enforced:
        return ""
    opening = call_opening(model.tokenizer, asked.named)
    if opening is None:
        raise ApiError(
            400,
            f"Model '{model.name}''s template does not write calls as JSON with a name, so tool_choice "
            f'{asked.choice!r} cannot be enforced; send tool_choice "auto".',
            "tool_choice",
        )
    return opening


async def chat(body: ChatRequest, request: Request) -> Any:
    state = server_state(request)
    model = state.served(body.model)
    body.check_implemented()
    check_chat(body)
    max_tokens = state.limit_tokens(body.max_completion_tokens or body.max_tokens)
    messages = history(body)
    asked = tools_asked(body, model)
    opening = forced_opening(model, asked)

    def encode() -> list[int]:
        forced = model.tokenizer(opening, add_special_tokens=False)["input_ids"] if opening else []
        return prompt_ids(model.tokenizer, messages, asked.rendered_tools) + forced

    ids = await tokenize(encode, "messages")
    record = {"messages": [m.model_dump(exclude_none=True) for m in body.messages], "tools": list(asked.tools) or None}
    calls = ToolCalling(asked, model.tool_format if asked.rendered_tools else None, opening)
    return await answer(request, state, "chat", body, model, ids, max_tokens, record, calls)


async def completions(body: CompletionRequest, request: Request) -> Any:
    state = server_state(request)
    model = state.served(body.model)
    body.check_implemented()
    check_completion(body)
    max_tokens = state.limit_tokens(body.max_tokens)
    ids = await tokenize(lambda: model.tokenizer(body.prompt, add_special_tokens=True)["input_ids"], "prompt")
    record = {"messages": [{"role": "prompt", "content": body.prompt}]}
    return await answer(request, state, "completions", body, model, ids, max_tokens, record)


async def models(request: Request) -> Any:
    # No paths: where the runs live on the server is none of a client's business.
    created = int(time.time())
    names = server_state(request).engine.models
    data = [{"id": name, "object": "model", "created": created, "owned_by": "tunesmith"} for name in names]
    return {"object": "list", "data": data}


async def feedback(body: FeedbackRequest, request: Request) -> Any:
    state = server_state(request)
    check_feedback(body)

    def record() -> int:
        """Checked and written in one go on the log's one writer thread: two posts cannot both take the last place."""
        if not state.log.has(body.id):
            raise ApiError(404, f"No response with id '{body.id}' was logged by this server.", "id", "not_found_error")
        if state.log.feedback_count(body.id) >= limits.MAX_FEEDBACK_PER_RESPONSE:
            raise ApiError(
                409,
                f"Response '{body.id}' already has {limits.MAX_FEEDBACK_PER_RESPONSE} feedback entries, this "
                "server's limit per response; nothing more is recorded for it.",
                "id",
                "conflict_error",
            )
        return state.log.feedback(body.id, body.rating, body.correction, body.comment)

    feedback_id = await state.logged(record)
    return {"id": feedback_id, "request_id": body.id, "status": "recorded"}


async def health(request: Request) -> Any:
    engine = server_state(request).engine
    alive = engine.alive
    content = {
        "status": "ok" if alive else "down",
        "worker": "alive" if alive else "stopped",
        "models": list(engine.models),
        "queued": engine.waiting,
    }
    return JSONResponse(content, status_code=200 if alive else 503)  # load balancers read the status


async def prometheus(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    state = server_state(request)
    state.metrics.queue.set(state.engine.waiting)
    state.metrics.queue_peak.set(state.engine.peak_waiting)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@dataclass(frozen=True)
class ToolCalling:
    """How a chat answer is read for calls: what was asked, the template's parser (None: the answer is plain
    text) and the forced opening the generated text continues."""

    asked: ToolRequest = ToolRequest()
    parser: str | None = None
    opening: str = ""

    def splitter(self) -> AnswerSplitter | None:
        return None if self.parser is None else AnswerSplitter(self.parser, self.opening)


@dataclass
class Generation:
    """One submitted request: where its events arrive, and what its metrics, log row and replies are made of."""

    state: ServerState
    endpoint: str
    model: Served
    ids: list[int]
    record: dict
    job: Job
    events: asyncio.Queue
    # The request's loop: a stream's cleanup can run where no loop is current.
    loop: asyncio.AbstractEventLoop
    started: float
    include_usage: bool = False  # the stream ends with a usage chunk, as stream_options.include_usage asks
    calls: ToolCalling = field(default_factory=ToolCalling)
    response_id: str = field(init=False)
    created: int = field(init=False)

    def __post_init__(self) -> None:
        self.response_id = f"{'chatcmpl' if self.endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    @property
    def failed(self) -> str:
        return f"Generation failed; the server's log has the details (request {self.response_id})."

    def finish(
        self,
        result: Result | None,
        status: int,
        error: str | None = None,
        output: str | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> dict:
        """Count the request in the metrics; the row for the request log (the output with its forced opening)."""
        elapsed = time.perf_counter() - self.started
        metrics, labels = self.state.metrics, (self.endpoint, self.model.name)
        metrics.requests.labels(*labels, str(status)).inc()
        metrics.latency.labels(*labels).observe(elapsed)
        metrics.queue.set(self.state.engine.waiting)
        if status >= 400:
            metrics.errors.labels(*labels, str(status)).inc()
        if result is not None:
            metrics.prompt_tokens.labels(*labels).inc(result.prompt_tokens)
            metrics.generated_tokens.labels(*labels).inc(result.completion_tokens)
            if result.first_token_s is not None:
                metrics.first_token.labels(*labels).observe(result.first_token_s)
        return dict(
            id=self.response_id,
            endpoint=self.endpoint,
            model=self.model.name,
            status=status,
            latency_ms=elapsed * 1000,
            first_token_ms=None if result is None or result.first_token_s is None else result.first_token_s * 1000,
            prompt_tokens=len(self.ids),
            completion_tokens=None if result is None else result.completion_tokens,
            output=output if result is None else self.calls.opening + result.text,
            finish_reason=None if result is None else result.finish_reason,
            error=error,
            tool_calls=tool_calls or None,
            **self.record,
        )

    def dropped(self, output: str | None) -> None:
        """The client left: stop its generation and log the request, without waiting on the log."""
        self.job.cancelled.set()
        row = self.finish(None, CLIENT_GONE, "client disconnected", output)
        self.loop.run_in_executor(self.state.log_writer, self.state.save, row)

    def reply(self, kind: str, choice: dict | None, result: Result | None = None) -> dict:
        """The OpenAI envelope shared by every answer and stream chunk (no choice: a usage chunk); usage once
        generation is done."""
        reply = {"id": self.response_id, "object": kind, "created": self.created, "model": self.model.name}
        reply["choices"] = [] if choice is None else [choice]
        if result is not None:
            total = result.prompt_tokens + result.completion_tokens
            reply["usage"] = {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": total,
            }
        return reply

    @property
    def chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"

    def chunk(self, delta: str | None, finish_reason: str | None, result: Result | None = None) -> str:
        if self.endpoint == "chat":
            choice = {"index": 0, "delta": {} if delta is None else {"content": delta}, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish_reason, "logprobs": None}
        return event(self.reply(self.chunk_kind, choice, result))

    def delta_chunk(self, delta: dict[str, Any]) -> str:
        """A chat stream chunk of any delta (a part of the tool calls)."""
        return event(self.reply(self.chunk_kind, {"index": 0, "delta": delta, "finish_reason": None}))

    def opening(self) -> str:
        """A chat stream's first chunk names the speaker, as OpenAI's do, before any token (there may be none)."""
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        return event(self.reply(self.chunk_kind, choice))

    def ending(self, result: Result, called: bool = False) -> list[str]:
        """The finish chunk, and with include_usage a last chunk of usage with no choices (OpenAI's order);
        without it the finish chunk carries the usage."""
        finish = reason(result, called)
        if not self.include_usage:
            return [self.chunk(None, finish, result)]
        return [self.chunk(None, finish), event(self.reply(self.chunk_kind, None, result))]


def event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def reason(result: Result, called: bool = False) -> str:
    """OpenAI's finish_reason: an answer that calls ends with "tool_calls" (a whole call was read, however it ended)."""
    if called:
        return "tool_calls"
    return "length" if result.finish_reason == "length" else "stop"  # a cancelled row has no client left


async def answer(
    request: Request,
    state: ServerState,
    endpoint: str,
    body: Sampling,
    model: Served,
    ids: list[int],
    max_tokens: int,
    record: dict,
    calls: ToolCalling | None = None,
) -> Any:
    """Check the prompt fits, submit the job, and answer as a stream or as one reply."""
    check_prompt_length(state.engine, endpoint, ids, max_tokens)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(kind: str, value: Any) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (kind, value))

    job = Job(model, ids, max_tokens, body.temperature, body.top_p, body.stop or [], body.seed, emit, body.stream)
    started = time.perf_counter()
    state.submit(job, endpoint)
    generation = Generation(
        state, endpoint, model, ids, record, job, events, loop, started, body.include_usage, calls or ToolCalling()
    )
    if body.stream:
        headers = {"Cache-Control": "no-cache"}
        return StreamingResponse(stream_answer(generation), media_type="text/event-stream", headers=headers)
    return await whole_answer(request, generation)


class AnswerPieces:
    """A streamed chat answer's text as chunks: its opening <think> block as reasoning_content deltas (where the
    served template writes reasoning so), the rest as content, or held for the call splitter where tools are on."""

    def __init__(self, generation: Generation) -> None:
        self.generation, self.splitter = generation, generation.calls.splitter()
        chat = generation.endpoint == "chat"
        self.thinking = ReasoningSplitter() if chat and generation.model.reasoning else None

    def feed(self, delta: str) -> Iterator[str]:
        return self._chunks(*(self.thinking.feed(delta) if self.thinking else ("", delta)))

    def finish(self) -> Iterator[str]:
        """What the splitters held back to the end (the call splitter's own end is stream_calls')."""
        return self._chunks(*self.thinking.finish()) if self.thinking else iter(())

    def _chunks(self, reasoning: str, text: str) -> Iterator[str]:
        if reasoning:
            yield self.generation.delta_chunk({"reasoning_content": reasoning})
        content = text if self.splitter is None else self.splitter.feed(text)
        if content:
            yield self.generation.chunk(content, None)


async def stream_answer(generation: Generation) -> AsyncIterator[str]:
    """Server-sent events: one chunk per delta, then the finish with usage and [DONE], or an error event. With
    tools, text that may be a call waits until the end, when the calls go out as OpenAI streams them."""
    sent, ended = "", False
    pieces = AnswerPieces(generation)
    splitter = pieces.splitter
    try:
        if generation.endpoint == "chat":
            yield generation.opening()
        while True:
            kind, value = await generation.events.get()
            if kind == "delta":
                sent += value
                for chunk in pieces.feed(value):
                    yield chunk
                continue
            ended = True
            if kind == "done":
                for chunk in pieces.finish():
                    yield chunk
            if kind == "done" and splitter is not None:
                async for chunk in stream_calls(generation, splitter, value):
                    yield chunk
            elif kind == "done":
                await generation.state.saved(generation.finish(value, 200))
                for chunk in generation.ending(value):
                    yield chunk
                yield "data: [DONE]\n\n"
            else:
                await generation.state.saved(generation.finish(None, 500, value, sent))
                yield event({"error": {"message": generation.failed, "type": "server_error"}})
            return
    finally:
        if not ended:  # the client went away mid-stream
            generation.dropped(sent)


async def stream_calls(generation: Generation, splitter: AnswerSplitter, result: Result) -> AsyncIterator[str]:
    """A tool answer's end: the content held back, the calls, the finish; or the error of a call that was required
    and not made."""
    answered, rest = splitter.finish()
    problem = enforcement_error(answered, generation.calls.asked)
    if problem is not None:
        await generation.state.saved(generation.finish(result, 500, problem))
        yield event({"error": {"message": problem, "type": "server_error"}})
        return
    calls = wire_calls(answered.calls)
    await generation.state.saved(generation.finish(result, 200, tool_calls=calls))
    if rest:
        yield generation.chunk(rest, None)
    for delta in call_deltas(calls):
        yield generation.delta_chunk(delta)
    for chunk in generation.ending(result, bool(calls)):
        yield chunk
    yield "data: [DONE]\n\n"


def chat_message(generation: Generation, result: Result) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The answer's message (content without call markup, the calls in OpenAI's shape) and its calls; raises the
    error of a required call not made."""
    reasoning, text = split_reasoning(result.text) if generation.model.reasoning else (None, result.text)
    apart = {} if reasoning is None else {"reasoning_content": reasoning}  # as vLLM's reasoning parsers send it
    splitter = generation.calls.splitter()
    if splitter is None:
        return {"role": "assistant", "content": text, **apart}, []
    splitter.feed(text)
    answered, _ = splitter.finish()
    problem = enforcement_error(answered, generation.calls.asked)
    if problem is not None:
        raise ApiError(500, problem, "tool_choice", "server_error")
    if not answered.calls:
        return {"role": "assistant", "content": answered.content, **apart}, []
    calls = wire_calls(answered.calls)  # OpenAI's content is null beside calls when there is no text
    return {"role": "assistant", "content": answered.content or None, "tool_calls": calls, **apart}, calls


async def whole_answer(request: Request, generation: Generation) -> Any:
    """One JSON reply once generation is done; a client that leaves before then cancels its job."""

    async def watch() -> None:
        """Tell the wait below when the client disconnects (the body is read, so only that can arrive)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        generation.events.put_nowait(("gone", None))

    watcher = asyncio.create_task(watch())
    try:
        kind, value = await generation.events.get()  # no deltas come for a job that does not stream
    finally:
        watcher.cancel()
    if kind == "gone":
        generation.dropped(None)
        return Response(status_code=CLIENT_GONE)
    if kind == "error":
        await generation.state.saved(generation.finish(None, 500, value))
        raise ApiError(500, generation.failed, None, "server_error")
    if generation.endpoint == "chat":
        try:
            message, calls = chat_message(generation, value)
        except ApiError as error:
            await generation.state.saved(generation.finish(value, error.status, error.message))
            raise
        await generation.state.saved(generation.finish(value, 200, tool_calls=calls))
        choice = {"index": 0, "message": message, "finish_reason": reason(value, bool(calls))}
        return generation.reply("chat.completion", choice, value)
    await generation.state.saved(generation.finish(value, 200))
    choice = {"index": 0, "text": value.text, "finish_reason": reason(value), "logprobs": None}
    return generation.reply("text_completion", choice, value)


def default_log_path(run_dir: Path) -> Path:
    return RunDir(run_dir).serve_log
