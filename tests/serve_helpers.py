"""What the serve and monitor tests share: a server in a thread that always stops, an OpenAI client, raw HTTP,
and hooks into the engine. Fixtures (`runs`, `server`) live in conftest.py; nothing here imports openai at load."""

from __future__ import annotations

import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tunesmith.data.formats import Message
from tunesmith.deploy.engine import Engine
from tunesmith.rundir import RunDir

KEY = "test-key"
PROMPTS = ["colour red item 1", "colour blue item 7", "colour pink item 30"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` on a free port in a thread for the block and yield its URL. The server stops when the block
    ends, however it ends: open connections get 5 s, then it is forced; a server that will not stop fails."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started:
            assert thread.is_alive(), "server failed to start"
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        if thread.is_alive():
            server.force_exit = True
            thread.join(10)
    assert not thread.is_alive(), "server did not stop"


@contextmanager
def serving(engine: Engine, log_folder: Path) -> Iterator[tuple[str, Path, object]]:
    """A live server over `engine` with its request log in `log_folder`, for the block: (url, log path, app). The
    engine is closed when the block ends."""
    from tunesmith.deploy.requestlog import RequestLog
    from tunesmith.deploy.serve import create_app

    log = RequestLog(log_folder / "requests.sqlite")
    app = create_app(engine, log, api_key=KEY, max_tokens_limit=64, default_max_tokens=8)
    try:
        with running(app) as url:
            yield url, log.path, app
    finally:
        engine.close()


def run_with_template(run: Path, root: Path, name: str, template: Callable[[str], str]) -> Path:
    """A copy of `run` named `name` under `root` whose saved chat template is template(its template): a run as
    training would have saved it with another template (one with a tools block, say)."""
    copy = root / name
    shutil.copytree(run, copy)
    saved = RunDir(copy).chat_template
    saved.write_text(template(saved.read_text()))
    return copy


def client(url: str, key: str = KEY):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def reference(run: Path, prompt: str, base: bool = False) -> str:
    """The run's answer to `prompt` generated offline, as `tunesmith evaluate` would (8 tokens, greedy)."""
    from tunesmith.evaluate.generate import generate, load_run

    loaded = load_run(run, base=base)
    return generate(loaded.model, loaded.tokenizer, [(Message("user", prompt),)], max_new_tokens=8)[0]


def sample(text: str, name: str, *labels: str) -> float:
    """The sum of a Prometheus metric's samples whose line carries every label given."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(label in line for label in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total


def raw(url: str, request: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no client fixing up Host or framing) and read the answer until the server closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def openai_error(response) -> dict:
    """The error of a response, checked to have OpenAI's shape and the response's status as its code."""
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == response.status_code
    return error


def wait_for(condition, seconds: float = 15.0):
    deadline = time.time() + seconds
    while not (value := condition()):
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)
    return value


def logged(db: Path, status: int) -> list[tuple]:
    """The request log's rows of one status: (status, output, error, finish_reason)."""
    with sqlite3.connect(db) as con:
        return con.execute(
            "SELECT status, output, error, finish_reason FROM requests WHERE status=?", (status,)
        ).fetchall()


class HookedModel:
    """The engine's model with a hook before every forward pass (slow it down, count it, make it fail). Set it
    before the first request: the worker sets up its generation engine over `engine.model` then."""

    def __init__(self, model, before) -> None:
        self.model, self.before, self.calls = model, before, 0

    def __call__(self, **inputs):
        self.calls += 1
        self.before(inputs)
        return self.model(**inputs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def held(engine: Engine, when=lambda jobs: True) -> threading.Event:
    """Hold the worker in the first step whose running jobs pass `when`, until the returned event is set, so later
    requests queue up."""
    release, step, first = threading.Event(), engine._step, []

    def step_held(generator):
        if not first and when([answer.job for answer in engine.running]):
            first.append(True)
            release.wait(30)
        return step(generator)

    engine._step = step_held
    return release


def endless(engine: Engine, seconds_per_token: float) -> HookedModel:
    """No stop token or text, and a slow model: only max_tokens or a client leaving ends an answer."""
    for served in engine.models.values():
        served.stop_ids, served.stop_texts = [], []
    engine.model = HookedModel(engine.model, lambda inputs: time.sleep(seconds_per_token))
    return engine.model
