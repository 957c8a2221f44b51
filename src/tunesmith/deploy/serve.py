"""`tunesmith serve`: an OpenAI-compatible HTTP API over a run's model (FastAPI + uvicorn).

Endpoints: POST /v1/chat/completions and /v1/completions (JSON or server-sent events with
"stream": true), GET /v1/models, POST /v1/feedback (rating and correction for a response id),
GET /health, GET /metrics (Prometheus). With an API key set, every /v1 call needs
"Authorization: Bearer KEY" and gets 401 otherwise. Errors use OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, with a message that says what to change.
Chat prompts are rendered with the run's own chat template, exactly as in training.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from tunesmith.data.formats import Message
from tunesmith.data.tokenize import prompt_ids
from tunesmith.deploy.engine import Busy, Engine, Job, Result, Served
from tunesmith.deploy.requestlog import RequestLog

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class Sampling(BaseModel):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1, description="Only one choice per request is generated.")
    user: str | None = None


class ChatRequest(Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(Sampling):
    prompt: str


class FeedbackRequest(BaseModel):
    id: str = Field(description="The id of a response returned by this server (chatcmpl-... or cmpl-...).")
    rating: float | None = Field(default=None, ge=-1.0, le=5.0)
    correction: str | None = None
    comment: str | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


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
        self.batch = Histogram(
            "tunesmith_batch_size", "Requests generated together in one batch",
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry,
        )  # fmt: skip


def create_app(
    engine: Engine,
    log: RequestLog,
    api_key: str | None = None,
    max_tokens_limit: int = 1024,
    default_max_tokens: int = 256,
) -> Any:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    app = FastAPI(title="tunesmith", description="OpenAI-compatible API over fine-tuned models.")
    metrics = Metrics()
    app.state.engine, app.state.log, app.state.metrics = engine, log, metrics
    engine.on_batch = metrics.batch.observe

    def error_body(status: int, message: str, param: str | None, kind: str) -> JSONResponse:
        return JSONResponse(
            status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": status}}
        )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_body(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            message = f"The request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})."
            return error_body(400, message, None, "invalid_request_error")
        where = ".".join(str(part) for part in first.get("loc", ())[1:])
        if not where:
            message = "The request body must be a JSON object sent with 'Content-Type: application/json'."
            return error_body(400, message, None, "invalid_request_error")
        return error_body(400, f"Field '{where}': {first.get('msg')}.", where, "invalid_request_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        if api_key and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(given.encode(), api_key.encode()):
                return error_body(
                    401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.", None, "authentication_error"
                )
        return await call_next(request)

    def served(name: str) -> Served:
        if name not in engine.models:
            raise ApiError(
                404,
                f"Model '{name}' is not served here; available: {', '.join(engine.models)}.",
                "model",
                "not_found_error",
            )
        return engine.models[name]

    def limit_tokens(requested: int | None) -> int:
        tokens = requested or default_max_tokens
        if tokens > max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens {tokens} is over this server's limit of {max_tokens_limit}; ask for fewer.",
                "max_tokens",
            )
        return tokens

    def stops(value: str | list[str] | None) -> list[str]:
        return [value] if isinstance(value, str) else list(value or [])

    async def answer(
        endpoint: str, body: Sampling, model: Served, ids: list[int], max_tokens: int, record: dict
    ) -> Any:
        if len(ids) + max_tokens > engine.context_limit:
            raise ApiError(
                400,
                f"The prompt is {len(ids)} tokens; with max_tokens {max_tokens} it exceeds the context of "
                f"{engine.context_limit}. Shorten the prompt or lower max_tokens.",
                "messages",
            )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        job = Job(model, ids, max_tokens, body.temperature, body.top_p, stops(body.stop), body.seed, emit)
        started = time.perf_counter()
        try:
            engine.submit(job)
        except Busy:
            raise ApiError(
                503, f"The server is busy ({engine.waiting} requests queued); retry shortly.", None, "server_busy"
            ) from None
        metrics.queue.set(engine.waiting)
        response_id = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        labels = (endpoint, model.name)

        def finish(result: Result | None, status: int, error: str | None = None) -> None:
            elapsed = time.perf_counter() - started
            metrics.requests.labels(*labels, str(status)).inc()
            metrics.latency.labels(*labels).observe(elapsed)
            metrics.queue.set(engine.waiting)
            if status >= 400:
                metrics.errors.labels(*labels, str(status)).inc()
            if result is not None:
                metrics.prompt_tokens.labels(*labels).inc(result.prompt_tokens)
                metrics.generated_tokens.labels(*labels).inc(result.completion_tokens)
                if result.first_token_s is not None:
                    metrics.first_token.labels(*labels).observe(result.first_token_s)
            log.record(
                id=response_id,
                endpoint=endpoint,
                model=model.name,
                status=status,
                latency_ms=elapsed * 1000,
                first_token_ms=None if result is None or result.first_token_s is None else result.first_token_s * 1000,
                prompt_tokens=len(ids),
                completion_tokens=None if result is None else result.completion_tokens,
                output=None if result is None else result.text,
                finish_reason=None if result is None else result.finish_reason,
                error=error,
                **record,
            )

        def reply(kind: str, choice: dict, result: Result | None = None) -> dict:
            """The OpenAI envelope shared by every answer and stream chunk; usage once generation is done."""
            reply_ = {"id": response_id, "object": kind, "created": created, "model": model.name, "choices": [choice]}
            if result is not None:
                total = result.prompt_tokens + result.completion_tokens
                reply_["usage"] = {
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens,
                    "total_tokens": total,
                }
            return reply_

        def reason(result: Result) -> str:
            return "length" if result.finish_reason == "length" else "stop"  # a cancelled row has no client left

        role_sent = False

        def chunk(delta: str | None, finish_reason: str | None, result: Result | None = None) -> str:
            nonlocal role_sent
            if endpoint == "chat":
                choice = {
                    "index": 0,
                    "delta": {} if delta is None else {"content": delta},
                    "finish_reason": finish_reason,
                }
                if delta is not None and not role_sent:  # the first delta names the speaker, as OpenAI's do
                    choice["delta"]["role"] = "assistant"
                    role_sent = True
                kind = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish_reason, "logprobs": None}
                kind = "text_completion"
            return f"data: {json.dumps(reply(kind, choice, result))}\n\n"

        if body.stream:

            async def stream() -> Any:
                try:
                    while True:
                        kind, value = await events.get()
                        if kind == "delta":
                            yield chunk(value, None)
                        elif kind == "done":
                            yield chunk(None, reason(value), value)
                            yield "data: [DONE]\n\n"
                            finish(value, 200)
                            return
                        else:
                            yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
                            finish(None, 500, value)
                            return
                finally:
                    job.cancelled.set()  # a client that went away stops the generation at the next token

            return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        while True:
            kind, value = await events.get()
            if kind == "done":
                break
            if kind == "error":
                finish(None, 500, value)
                raise ApiError(500, f"Generation failed: {value}", None, "server_error")
        finish(value, 200)
        if endpoint == "chat":
            message = {"role": "assistant", "content": value.text}
            return reply("chat.completion", {"index": 0, "message": message, "finish_reason": reason(value)}, value)
        choice = {"index": 0, "text": value.text, "finish_reason": reason(value), "logprobs": None}
        return reply("text_completion", choice, value)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Any:
        model = served(body.model)
        if not body.messages:
            raise ApiError(400, "messages is empty: send at least one message with role 'user'.", "messages")
        if body.messages[-1].role == "assistant":
            raise ApiError(
                400, "The last message is the assistant's; end with a user message to get an answer.", "messages"
            )
        max_tokens = limit_tokens(body.max_completion_tokens or body.max_tokens)
        messages = tuple(Message(m.role, m.content) for m in body.messages)
        ids = prompt_ids(model.tokenizer, messages)
        record = {"messages": [m.model_dump() for m in body.messages]}
        return await answer("chat", body, model, ids, max_tokens, record)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        model = served(body.model)
        if not body.prompt:
            raise ApiError(400, "prompt is empty.", "prompt")
        max_tokens = limit_tokens(body.max_tokens)
        ids = model.tokenizer(body.prompt, add_special_tokens=True)["input_ids"]
        return await answer(
            "completions", body, model, ids, max_tokens, {"messages": [{"role": "prompt", "content": body.prompt}]}
        )

    @app.get("/v1/models")
    async def models() -> Any:
        created = int(time.time())
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "tunesmith",
                    "root": str(item.run_dir) if item.run_dir else "base",
                }
                for name, item in engine.models.items()
            ],
        }

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackRequest) -> Any:
        if body.rating is None and body.correction is None:
            raise ApiError(400, "Send a rating, a correction, or both.", "rating")
        if not log.has(body.id):
            raise ApiError(404, f"No response with id '{body.id}' was logged by this server.", "id", "not_found_error")
        feedback_id = log.feedback(body.id, body.rating, body.correction, body.comment)
        return {"id": feedback_id, "request_id": body.id, "status": "recorded"}

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok", "models": list(engine.models), "queued": engine.waiting}

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        metrics.queue.set(engine.waiting)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def default_log_path(run_dir: Path) -> Path:
    return run_dir / "serve" / "requests.sqlite"
