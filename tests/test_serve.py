"""The OpenAI-compatible server, its request log and metrics, monitoring and the vLLM hand-off."""

from __future__ import annotations

import collections
import json
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import train_lora_run
from tunesmith.cli import main
from tunesmith.data.formats import Message
from tunesmith.deploy.engine import Busy, Engine, Job
from tunesmith.deploy.requestlog import RequestLog
from tunesmith.deploy.serve import create_app
from tunesmith.errors import TunesmithError

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "test-key"
PROMPTS = ["colour red item 1", "colour blue item 7", "colour pink item 30"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running(app):
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, lora_run):
    second = train_lora_run(tmp_path_factory.mktemp("second"), tiny_model_dir, "shades", 7, "--lr", "5e-2")
    return [lora_run, second]


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    engine = Engine(runs, queue_size=64)
    log = RequestLog(tmp_path_factory.mktemp("log") / "requests.sqlite")
    app = create_app(engine, log, api_key=KEY, max_tokens_limit=64, default_max_tokens=8)
    with running(app) as url:
        yield url, log.path, app
    engine.close()


def client(url, key=KEY):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def _reference(run, prompt, base=False):
    from tunesmith.evaluate.generate import generate, load_run

    loaded = load_run(run, base=base)
    return generate(loaded.model, loaded.tokenizer, [(Message("user", prompt),)], max_new_tokens=8)[0]


def test_models_are_listed_per_run_and_base(server):
    url, _, _ = server
    assert sorted(m.id for m in client(url).models.list()) == ["base", "colours", "shades"]


def test_chat_answers_equal_offline_generation_for_each_adapter_and_the_base(server, runs):
    url, _, _ = server
    api = client(url)
    answers = {}
    for name, run, base in (("colours", runs[0], False), ("shades", runs[1], False), ("base", runs[0], True)):
        for prompt in PROMPTS:
            reply = api.chat.completions.create(
                model=name, messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0
            )
            answers[name, prompt] = reply.choices[0].message.content
            assert reply.choices[0].message.content.strip() == _reference(run, prompt, base=base)
            assert reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 5
    # The routing is real: the adapters and the base do not all answer alike.
    assert len({tuple(answers[n, p] for p in PROMPTS) for n in ("colours", "shades", "base")}) > 1


def test_streaming_chat_and_completions_give_the_same_text_as_non_streaming(server):
    url, _, _ = server
    api = client(url)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    whole = api.chat.completions.create(model="colours", messages=messages, max_tokens=8).choices[0].message.content
    chunks = list(api.chat.completions.create(model="colours", messages=messages, max_tokens=8, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1
    plain = api.completions.create(model="base", prompt="colour red", max_tokens=6).choices[0].text
    streamed = "".join(
        c.choices[0].text for c in api.completions.create(model="base", prompt="colour red", max_tokens=6, stream=True)
    )
    assert streamed == plain


def test_api_key_is_required(server):
    url, _, _ = server
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").models.list()
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").json()["status"] == "ok"  # health needs no key


def test_bad_requests_get_clear_4xx_answers(server):
    url, _, _ = server
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    post = lambda body: httpx.post(f"{url}/v1/chat/completions", content=body, headers=headers)  # noqa: E731
    bad_json = post("{not json")
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    unknown = post(json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}))
    assert unknown.status_code == 404 and "colours" in unknown.json()["error"]["message"]
    empty = post(json.dumps({"model": "colours", "messages": []}))
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "messages"
    too_many = post(json.dumps({"model": "colours", "messages": [{"role": "user", "content": "x"}], "max_tokens": 65}))
    assert too_many.status_code == 400 and "limit of 64" in too_many.json()["error"]["message"]
    bad_role = post(json.dumps({"model": "colours", "messages": [{"role": "robot", "content": "x"}]}))
    assert bad_role.status_code == 400 and bad_role.json()["error"]["param"] == "messages.0.role"
    with pytest.raises(openai.NotFoundError):
        client(url).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_fifty_concurrent_requests_all_succeed_and_are_counted(server):
    url, db, _ = server
    api = client(url)

    def ask(i: int) -> str:
        stream = i % 2 == 0
        reply = api.chat.completions.create(
            model=("colours", "shades", "base")[i % 3],
            messages=[{"role": "user", "content": f"colour red item {i}"}],
            max_tokens=6,
            stream=stream,
        )
        return "".join(c.choices[0].delta.content or "" for c in reply if c.choices) if stream else reply.id

    before = httpx.get(f"{url}/metrics").text
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(ask, range(50)))
    assert len(results) == 50  # any failure would have raised
    metrics = httpx.get(f"{url}/metrics").text
    assert _sample(metrics, "tunesmith_requests_total", 'endpoint="chat"', 'status="200"') >= 50 + _sample(
        before, "tunesmith_requests_total", 'endpoint="chat"', 'status="200"'
    )
    assert _sample(metrics, "tunesmith_generated_tokens_total") > 0
    assert _sample(metrics, "tunesmith_time_to_first_token_seconds_count") >= 50
    assert _sample(metrics, "tunesmith_request_latency_seconds_count") >= 50
    assert "tunesmith_request_errors_total" in metrics or "tunesmith_request_errors" in metrics


def _sample(text: str, name: str, *labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(label in line for label in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_every_request_is_logged_and_feedback_is_recorded(server):
    url, db, _ = server
    api = client(url)
    reply = api.chat.completions.create(model="colours", messages=[{"role": "user", "content": "colour green item 2"}])
    with sqlite3.connect(db) as con:
        row = con.execute(
            "SELECT model, status, latency_ms, prompt_tokens, completion_tokens, messages, output "
            "FROM requests WHERE id=?",
            (reply.id,),
        ).fetchone()
    assert row[0] == "colours" and row[1] == 200 and row[2] > 0 and row[3] > 0 and row[4] >= 1
    assert json.loads(row[5])[0]["content"] == "colour green item 2" and row[6] == reply.choices[0].message.content
    headers = {"Authorization": f"Bearer {KEY}"}
    ok = httpx.post(
        f"{url}/v1/feedback", json={"id": reply.id, "rating": 1, "correction": '{"colour": "green"}'}, headers=headers
    )
    assert ok.status_code == 200 and ok.json()["status"] == "recorded"
    missing = httpx.post(f"{url}/v1/feedback", json={"id": "chatcmpl-nope", "rating": 5}, headers=headers)
    assert missing.status_code == 404
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT rating, correction FROM feedback WHERE request_id=?", (reply.id,)).fetchone() == (
            1.0,
            '{"colour": "green"}',
        )


def test_a_full_queue_answers_503_instead_of_crashing(runs, tmp_path):
    engine = Engine(runs[:1], queue_size=1)
    release = threading.Event()
    generate = engine._generate
    engine._generate = lambda job: (release.wait(20), generate(job))[1]
    app = create_app(engine, RequestLog(tmp_path / "r.sqlite"), default_max_tokens=2)
    body = {"model": "colours", "messages": [{"role": "user", "content": "x"}]}
    with running(app) as url, ThreadPoolExecutor(4) as pool:
        first = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=30)
        time.sleep(0.5)  # the worker holds the first job; the queue takes one more
        second = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=30)
        time.sleep(0.5)
        third = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert third.status_code == 503 and "busy" in third.json()["error"]["message"]
        assert int(third.headers["retry-after"]) >= 1  # when to come back, as OpenAI's clients read it
        release.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200
        assert _sample(httpx.get(f"{url}/metrics").text, "tunesmith_busy_refusals_total", 'endpoint="chat"') == 1
    engine.close()


def test_monitor_reports_drift_and_format_failures_and_exports_corrections(runs, tmp_path, capsys):
    from tunesmith.deploy.monitor import monitor_report

    db = tmp_path / "requests.sqlite"
    engine = Engine(runs[:1])
    app = create_app(engine, RequestLog(db), default_max_tokens=4)
    with running(app) as url:
        api = client(url, key="unused")
        ids = [
            api.chat.completions.create(model="colours", messages=[{"role": "user", "content": p}]).id
            for p in [*PROMPTS, *[f"zebra giraffe hippo safari number {i} " * 6 for i in range(5)]]
        ]
        for request_id, correction in ((ids[0], '{"colour": "red"}'), (ids[4], '{"colour": "none"}')):
            httpx.post(f"{url}/v1/feedback", json={"id": request_id, "rating": 0, "correction": correction})
        httpx.post(f"{url}/v1/feedback", json={"id": ids[1], "rating": 5})
    engine.close()
    report = monitor_report(runs[0], db)
    assert report["traffic"]["requests"] == 8 and report["traffic"]["errors"] == 0
    lengths, words = report["drift"]["prompt_tokens"], report["drift"]["vocabulary"]
    assert lengths["longer_than_training"] == pytest.approx(5 / 8)
    assert words["unseen_word_share"] > 0.5 and "zebra" in words["top_unseen"]
    assert any("Vocabulary drifted" in alert for alert in report["alerts"])
    # The toy run's eval metrics have no format check; the tiny random model's answers are not JSON either way.
    assert report["format"]["checks"] == []
    assert report["feedback"] == {"count": 3, "mean_rating": pytest.approx(5 / 3, abs=1e-3), "corrections": 2}

    out = tmp_path / "new.jsonl"
    assert main(["monitor", str(runs[0]), "--db", str(db), "--export", str(out), "--min-rating", "4"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["messages"][-1] == {"role": "assistant", "content": '{"colour": "red"}'}
    assert main(["monitor", str(runs[0]), "--db", str(db), "--export", str(out)]) == 2  # never overwritten silently
    assert main(["data", "check", str(out)]) in (0, 1)  # our format: no parse errors (1 = warnings only)
    assert "Traceback" not in capsys.readouterr().err
    assert main(["monitor", str(runs[0]), "--db", str(db), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["traffic"]["requests"] == 8


def test_monitor_counts_answers_failing_the_runs_format_check(runs, tmp_path):
    from tunesmith.deploy.monitor import monitor_report

    db = tmp_path / "requests.sqlite"
    log = RequestLog(db)
    for i, output in enumerate(['{"colour": "red"}', "not json", '{"colour": "blue"}', "{broken"]):
        log.record(
            id=f"r{i}",
            endpoint="chat",
            model="colours",
            status=200,
            latency_ms=10.0,
            prompt_tokens=30,
            completion_tokens=5,
            messages=[{"role": "user", "content": "colour red item 1"}],
            output=output,
        )
    log.record(id="r9", endpoint="chat", model="colours", status=500, error="boom")
    log.record(id="r10", endpoint="chat", model="colours", status=499, error="client gone")  # not a server failure
    run = runs[0]
    config_text = (run / "config.yaml").read_text()
    try:
        (run / "config.yaml").write_text(config_text.replace("- exact_match", "- exact_match\n  - json_valid", 1))
        report = monitor_report(run, db)
    finally:
        (run / "config.yaml").write_text(config_text)
    assert report["format"]["json_valid"]["failing"] == 2 and report["format"]["json_valid"]["share"] == 0.5
    assert report["traffic"]["errors"] == 1 and report["traffic"]["error_rate"] == round(1 / 6, 4)
    assert report["traffic"]["client_gone"] == 1
    assert any("fail json_valid" in alert for alert in report["alerts"])
    assert any("requests failed" in alert for alert in report["alerts"])


def test_vllm_engine_builds_the_command_and_says_how_to_install(runs, capsys, monkeypatch):
    assert main(["serve", *map(str, runs), "--engine", "vllm", "--dry-run", "--port", "9001", "--api-key", "s3"]) == 0
    command = capsys.readouterr().out.replace("\n", "")
    assert command.startswith("VLLM_API_KEY=*** vllm serve ") and "--enable-lora" in command  # key: in the env
    assert "--allowed-origins '[]'" in command  # vLLM's own default lets any web page call it
    assert f"colours={runs[0] / 'adapter'}" in command and f"shades={runs[1] / 'adapter'}" in command
    assert "--max-lora-rank 16" in command and "--served-model-name base" in command
    assert f"--chat-template {runs[0] / 'chat_template.jinja'}" in command and "--port 9001" in command
    assert "s3" not in command  # the key is neither printed nor on the command line
    from tunesmith.deploy.vllm import vllm_env

    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert vllm_env("s3")["VLLM_API_KEY"] == "s3" and "VLLM_API_KEY" not in vllm_env(None)
    monkeypatch.setattr("tunesmith.deploy.vllm.vllm_available", lambda: False)
    assert main(["serve", str(runs[0]), "--engine", "vllm"]) == 2
    assert "pip install vllm" in capsys.readouterr().err


@pytest.mark.slow
def test_tunesmith_serve_command_answers_the_openai_client(lora_run, tmp_path):
    port = _free_port()
    log = tmp_path / "log.sqlite"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tunesmith",
            "serve",
            str(lora_run),
            "--port",
            str(port),
            "--api-key",
            KEY,
            "--log-db",
            str(log),
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline
            time.sleep(0.5)
        reply = client(f"http://127.0.0.1:{port}").chat.completions.create(
            model="colours", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=8
        )
        assert reply.choices[0].message.content.strip() == _reference(lora_run, PROMPTS[0])
        assert Path(log).is_file()
    finally:
        process.terminate()
        process.wait(30)


def test_waiting_requests_are_generated_together_and_answer_as_alone(runs, tmp_path):
    engine = Engine(runs[:1], max_batch=8)
    release = threading.Event()
    generate = engine._generate
    engine._generate = lambda jobs: (
        release.wait(20) if len(jobs) == 1 and jobs[0].max_tokens == 1 else None,
        generate(jobs),
    )[1]
    app = create_app(engine, RequestLog(tmp_path / "r.sqlite"), default_max_tokens=8)
    prompts = ["colour red", "colour blue item 7 and more words here", "pink", "colour white item 12", "x y z"]
    with running(app) as url:
        api = client(url, key="unused")
        alone = [
            api.chat.completions.create(model="colours", messages=[{"role": "user", "content": p}])
            .choices[0]
            .message.content
            for p in prompts
        ]
        with ThreadPoolExecutor(8) as pool:
            blocker = pool.submit(api.chat.completions.create, model="colours", max_tokens=1,
                                  messages=[{"role": "user", "content": "hold"}])  # fmt: skip
            time.sleep(0.5)  # the worker is busy with the blocker; the next five queue up
            futures = [
                pool.submit(
                    api.chat.completions.create,
                    model="colours",
                    messages=[{"role": "user", "content": p}],
                    stream=i % 2 == 0,
                )  # fmt: skip
                for i, p in enumerate(prompts)
            ]
            time.sleep(0.5)
            release.set()
            blocker.result()
            together = []
            for i, future in enumerate(futures):
                reply = future.result()
                together.append(
                    "".join(c.choices[0].delta.content or "" for c in reply if c.choices) if i % 2 == 0
                    else reply.choices[0].message.content
                )  # fmt: skip
        metrics = httpx.get(f"{url}/metrics").text
    engine.close()
    assert max(engine.batch_sizes) == 5  # the five waiting requests went through as one batch
    assert together == alone  # left padding and the shared cache change nothing
    assert _sample(metrics, "tunesmith_batch_size_bucket", 'le="8.0"') >= 1


def _raw(url: str, request: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
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


def _openai_error(response) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == response.status_code
    return error


class _Model:
    """The engine's model with a hook before every forward pass (slow it down, count it, make it fail)."""

    def __init__(self, model, before) -> None:
        self.model, self.before, self.calls = model, before, 0

    def __call__(self, **inputs):
        self.calls += 1
        self.before(inputs)
        return self.model(**inputs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def _held(engine: Engine) -> threading.Event:
    """Hold the worker in its first batch until the returned event is set, so later requests queue up."""
    release, generate, first = threading.Event(), engine._generate, []

    def generate_held(jobs):
        if not first:
            first.append(True)
            release.wait(30)
        return generate(jobs)

    engine._generate = generate_held
    return release


def _wait_for(condition, seconds: float = 15.0):
    deadline = time.time() + seconds
    while not (value := condition()):
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)
    return value


def _rows(db: Path, status: int) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute(
            "SELECT status, output, error, finish_reason FROM requests WHERE status=?", (status,)
        ).fetchall()


BAD_BODIES = {
    "temperature not a number": ('"temperature": NaN', "temperature"),
    "temperature far out of range": ('"temperature": 1e308', "temperature"),
    "top_p zero": ('"top_p": 0', "top_p"),
    "seed beyond 64 bits": (f'"seed": {2**70}', "seed"),
    "seed of the wrong type": ('"seed": "lucky"', "seed"),
    "empty stop string": ('"stop": ""', "stop"),
    "huge stop string": (f'"stop": ["{"x" * 1000}"]', "stop"),
    "too many stop strings": (f'"stop": {json.dumps([str(i) for i in range(100)])}', "stop"),
    "stop of the wrong type": ('"stop": 5', "stop"),
    "absurd max_tokens": (f'"max_tokens": {10**30}', "max_tokens"),
    "max_tokens of the wrong type": ('"max_tokens": "many"', "max_tokens"),
    "model of the wrong type": ('"model": ["colours"]', "model"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_degenerate_values_get_a_400_naming_the_field(server, case):
    url, _, _ = server
    extra, param = BAD_BODIES[case]
    body = '{"model": "colours", "messages": [{"role": "user", "content": "hi"}], ' + extra + "}"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    if '"model": [' in extra:
        body = body.replace('"model": "colours", ', "")
    response = httpx.post(f"{url}/v1/chat/completions", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert _openai_error(response)["param"] == param


def test_broken_text_and_oversized_lists_get_a_400_in_openai_shape(server):
    url, _, _ = server
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    chat, completions = f"{url}/v1/chat/completions", f"{url}/v1/completions"
    surrogate = httpx.post(
        chat, content='{"model": "colours", "messages": [{"role": "user", "content": "a\\ud800b"}]}', headers=headers
    )
    assert surrogate.status_code == 400 and _openai_error(surrogate)["param"] == "messages.0.content"
    assert "surrogate" in surrogate.json()["error"]["message"]
    in_prompt = httpx.post(completions, content='{"model": "base", "prompt": "\\udfff"}', headers=headers)
    assert in_prompt.status_code == 400 and _openai_error(in_prompt)["param"] == "prompt"
    not_utf8 = httpx.post(chat, content=b'{"model": "colours", "messages": [{"role": "user", "content": "\xff"}]}',
                          headers=headers)  # fmt: skip
    assert not_utf8.status_code == 400 and "UTF-8" in _openai_error(not_utf8)["message"]
    wrong_type = httpx.post(chat, json={"model": "colours", "messages": [{"role": "user", "content": 7}]},
                            headers=headers)  # fmt: skip
    assert wrong_type.status_code == 400 and _openai_error(wrong_type)["param"] == "messages.0.content"
    many = httpx.post(chat, json={"model": "colours", "messages": [{"role": "user", "content": "x"}] * 600},
                      headers=headers)  # fmt: skip
    assert many.status_code == 400 and _openai_error(many)["param"] == "messages"
    unknown_path = httpx.get(f"{url}/v2/anything", headers=headers)
    assert unknown_path.status_code == 404 and _openai_error(unknown_path)["type"] == "not_found_error"


def test_degenerate_sampling_in_one_request_never_fails_its_batch_neighbours(runs, tmp_path):
    engine = Engine(runs[:1], max_batch=8)
    release = _held(engine)
    app = create_app(engine, RequestLog(tmp_path / "r.sqlite"), default_max_tokens=4)
    settings = [{}, {"temperature": 1e-50}, {}, {"temperature": 2.0, "top_p": 1e-300, "seed": 3}, {"seed": 2**64 - 1}]
    with running(app) as url, ThreadPoolExecutor(8) as pool:
        ask = lambda extra: httpx.post(  # noqa: E731
            f"{url}/v1/chat/completions",
            json={"model": "colours", "messages": [{"role": "user", "content": "colour red item 1"}], **extra},
            timeout=60,
        )
        blocker = pool.submit(ask, {})
        time.sleep(0.5)  # the worker holds the blocker; the others wait and then go as one batch
        replies = [pool.submit(ask, extra) for extra in settings]
        _wait_for(lambda: engine.waiting == len(settings))
        release.set()
        assert blocker.result().status_code == 200
        statuses = [reply.result().status_code for reply in replies]
    engine.close()
    assert statuses == [200] * len(settings)
    assert max(engine.batch_sizes) == len(settings)


def test_an_error_in_one_row_fails_that_request_only(runs):
    engine = Engine(runs[:1], max_batch=8)
    poison = 7

    def choke(inputs):  # a prompt the model cannot take fails the whole forward pass of its batch
        if inputs["input_ids"].shape[1] > 1 and (inputs["input_ids"] == poison).any():
            raise RuntimeError("this prompt breaks the model")

    engine.model = _Model(engine.model, choke)
    release = _held(engine)
    events: dict[str, list] = collections.defaultdict(list)

    def submit(name: str, ids: list[int], seed: int | None = None) -> None:
        emit = lambda kind, value: events[name].append(kind)  # noqa: E731
        engine.submit(Job(engine.models["colours"], ids, 3, 0.0, 1.0, [], seed, emit))

    submit("blocker", [5, 6])
    _wait_for(lambda: engine.waiting == 0)
    submit("good 1", [5, 6, 9])
    submit("seed out of torch's range", [5, 6, 9], seed=2**70)
    submit("good 2", [11, 12])
    submit("poisoned prompt", [5, poison, 9])
    submit("good 3", [13])
    release.set()
    _wait_for(lambda: len(events) == 6 and all(e[-1] in ("done", "error") for e in events.values()))
    engine.close()
    assert {name: kinds[-1] for name, kinds in events.items()} == {
        "blocker": "done",
        "good 1": "done",
        "seed out of torch's range": "error",
        "good 2": "done",
        "poisoned prompt": "error",
        "good 3": "done",
    }
    assert all(kinds.count("done") + kinds.count("error") == 1 for kinds in events.values())  # answered once


def test_everything_waiting_counts_against_the_queue_size(runs):
    engine = Engine(runs[:1], queue_size=2, max_batch=1)
    started, gate = threading.Semaphore(0), threading.Semaphore(0)

    def generate_gated(jobs):
        started.release()
        gate.acquire(timeout=30)

    engine._generate = generate_gated
    job = lambda: Job(engine.models["colours"], [5, 6], 1, 0.0, 1.0, [], None, lambda kind, value: None)  # noqa: E731
    engine.submit(job())
    assert started.acquire(timeout=10)  # the first is generating and holds no place
    engine.submit(job())
    engine.submit(job())
    with pytest.raises(Busy):
        engine.submit(job())
    gate.release()
    assert started.acquire(timeout=10)  # the second generates; the third waits in the worker's hands
    engine.submit(job())  # so one place is free, and one only
    with pytest.raises(Busy) as busy:
        engine.submit(job())
    assert engine.waiting == 2 and engine.peak_waiting == 2 and busy.value.retry_after >= 1
    for _ in range(4):
        gate.release()
    engine.close()


def test_oversized_bodies_get_413_before_they_are_read(runs, tmp_path):
    engine = Engine(runs[:1])
    app = create_app(engine, RequestLog(tmp_path / "r.sqlite"), default_max_tokens=2, max_body_bytes=1000)
    post = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    with running(app) as url:
        started = time.perf_counter()
        status, headers, body = _raw(url, (post + "Content-Length: 30000000\r\n\r\n{").encode())  # 1 byte of 30 MB
        assert status == 413 and time.perf_counter() - started < 5
        assert headers["connection"] == "close" and "1000 bytes" in json.loads(body)["error"]["message"]
        chunks = b"".join(b"%x\r\n%s\r\n" % (600, b" " * 600) for _ in range(2)) + b"0\r\n\r\n"
        status, _, body = _raw(url, (post + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunks)
        assert status == 413 and json.loads(body)["error"]["code"] == 413
        small = {"model": "colours", "messages": [{"role": "user", "content": "colour red"}]}
        assert httpx.post(f"{url}/v1/chat/completions", json=small, timeout=30).status_code == 200
    engine.close()


def test_health_answers_at_once_while_a_huge_prompt_is_refused(server):
    url, _, _ = server
    headers = {"Authorization": f"Bearer {KEY}"}
    huge = {"model": "colours", "messages": [{"role": "user", "content": "colour red item 1 " * 120_000}]}  # 2 MB
    with ThreadPoolExecutor(1) as pool:
        refused = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=huge, headers=headers, timeout=120)
        slowest = 0.0
        while not refused.done():
            started = time.perf_counter()
            assert httpx.get(f"{url}/health", timeout=30).status_code == 200
            slowest = max(slowest, time.perf_counter() - started)
            time.sleep(0.02)
    assert slowest < 0.75, f"/health took {slowest:.2f} s while the prompt was tokenized"
    reply = refused.result()
    assert reply.status_code == 400 and _openai_error(reply)["param"] == "messages"
    assert "--max-prompt-tokens" in reply.json()["error"]["message"]


def _endless(engine: Engine, seconds_per_token: float) -> _Model:
    """No stop token or text, and a slow model: only max_tokens or a client leaving ends an answer."""
    for served in engine.models.values():
        served.stop_ids, served.stop_texts = [], []
    engine.model = _Model(engine.model, lambda inputs: time.sleep(seconds_per_token))
    return engine.model


def test_a_client_that_disconnects_stops_its_generation_and_is_logged(runs, tmp_path):
    engine = Engine(runs[:1])
    model = _endless(engine, 0.05)
    db = tmp_path / "r.sqlite"
    app = create_app(engine, RequestLog(db), max_tokens_limit=400, default_max_tokens=400)
    body = {"model": "colours", "messages": [{"role": "user", "content": "colour red item 1"}]}
    with running(app) as url:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.5)
        _wait_for(lambda: _rows(db, 499))
        calls = model.calls
        time.sleep(0.5)
        assert model.calls - calls <= 2 and model.calls < 100  # stopped, far short of 400 tokens
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=30) as reply:
            next(reply.iter_lines())  # the first chunk, then the client goes away
        dropped = _wait_for(lambda: len(_rows(db, 499)) == 2 and _rows(db, 499))
        calls = model.calls
        time.sleep(0.5)
        assert model.calls - calls <= 2
    engine.close()
    assert all(row[2] == "client disconnected" for row in dropped)
    assert _rows(db, 200) == []


def test_a_request_log_that_cannot_be_written_never_loses_the_answer(runs, tmp_path):
    db = tmp_path / "r.sqlite"
    engine = Engine(runs[:1])
    app = create_app(engine, RequestLog(db), default_max_tokens=4)
    body = {"model": "colours", "messages": [{"role": "user", "content": "colour red item 1"}]}
    holder = sqlite3.connect(db)
    with running(app) as url:
        holder.execute("BEGIN EXCLUSIVE")  # another process holds the write lock past the log's busy timeout
        whole = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        streamed = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=30)
        holder.rollback()
        metrics = httpx.get(f"{url}/metrics").text
    engine.close()
    holder.close()
    assert whole.status_code == 200 and whole.json()["choices"][0]["message"]["content"] is not None
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    assert _sample(metrics, "tunesmith_request_log_errors_total") == 2
    assert _sample(metrics, "tunesmith_requests_total", 'status="200"') == 2


def test_the_prompt_is_held_to_the_training_length_unless_raised(runs, tmp_path):
    run = tmp_path / "colours"
    shutil.copytree(runs[0], run)
    config = (run / "config.yaml").read_text()
    assert "max_length: 1024" in config
    (run / "config.yaml").write_text(config.replace("max_length: 1024", "max_length: 16"))
    long_prompt = {"model": "colours", "messages": [{"role": "user", "content": "colour red item 1 " * 8}]}
    engine = Engine([run])
    assert engine.max_prompt_tokens == 16
    with running(create_app(engine, RequestLog(tmp_path / "a.sqlite"), default_max_tokens=2)) as url:
        refused = httpx.post(f"{url}/v1/chat/completions", json=long_prompt, timeout=30)
        assert refused.status_code == 400 and _openai_error(refused)["param"] == "messages"
        assert "at most 16" in refused.json()["error"]["message"]
    engine.close()
    engine = Engine([run], max_prompt_tokens=200)
    app = create_app(engine, RequestLog(tmp_path / "b.sqlite"), max_tokens_limit=1000, default_max_tokens=2)
    with running(app) as url:
        assert httpx.post(f"{url}/v1/chat/completions", json=long_prompt, timeout=30).status_code == 200
        too_long = httpx.post(f"{url}/v1/chat/completions", json={**long_prompt, "max_tokens": 500}, timeout=30)
        assert too_long.status_code == 400 and "context of 512" in _openai_error(too_long)["message"]
    engine.close()
    with pytest.raises(TunesmithError, match="--max-prompt-tokens 512"):
        Engine([run], max_prompt_tokens=512)


def test_auth_is_decided_on_the_routed_path_and_nothing_private_leaks(server, runs, monkeypatch):
    from starlette.datastructures import URL
    from starlette.requests import HTTPConnection

    url, _, app = server
    # A Host header with a path in it made the URL that Starlette < 1.0.1 rebuilt look like /health; it is not a
    # name this server answers to, so it is refused before the key is even looked at.
    for host in ("127.0.0.1/health?", "127.0.0.1/metrics#"):
        status, _, body = _raw(url, f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert status == 421, body
    with monkeypatch.context() as patch:  # as that Starlette would have rebuilt it, whatever the version installed
        patch.setattr(HTTPConnection, "url", property(lambda request: URL("http://127.0.0.1/health?/v1/models")))
        assert httpx.get(f"{url}/v1/models").status_code == 401
    headers = {"Authorization": f"Bearer {KEY}"}
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{url}{path}", headers=headers).status_code == 404
    assert httpx.get(f"{url}/docs").status_code == 401  # every path but /health and /metrics needs the key
    listed = httpx.get(f"{url}/v1/models", headers=headers)
    assert listed.status_code == 200 and str(runs[0].parent) not in listed.text and "/" not in listed.text
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["worker"] == "alive"
    with_docs = create_app(app.state.engine, app.state.log, api_key=KEY, docs=True)
    with running(with_docs) as docs_url:
        assert httpx.get(f"{docs_url}/docs").status_code == 200
        assert "/v1/chat/completions" in httpx.get(f"{docs_url}/openapi.json").json()["paths"]
    app.state.engine.on_batch = app.state.metrics.batch.observe  # back to the module server's metrics


class _BrokenTemplate:
    def apply_chat_template(self, *args, **kwargs):
        raise ValueError("secret template detail")


def test_failures_answer_500_without_their_text_and_a_stopped_worker_shows_in_health(runs, tmp_path):
    engine = Engine(runs[:1])

    def fail(inputs):
        raise RuntimeError("secret detail at /private/weights")

    engine.model = _Model(engine.model, fail)
    db = tmp_path / "r.sqlite"
    app = create_app(engine, RequestLog(db), default_max_tokens=2)
    body = {"model": "colours", "messages": [{"role": "user", "content": "colour red item 1"}]}
    with running(app) as url:
        failed = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert failed.status_code == 500 and _openai_error(failed)["type"] == "server_error"
        assert "secret" not in failed.text and "RuntimeError" not in failed.text
        streamed = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=30)
        assert "server_error" in streamed.text and "secret" not in streamed.text
        assert all("secret" in row[2] for row in _rows(db, 500))  # the details stay in the server's log
        engine.models["colours"].tokenizer = _BrokenTemplate()
        unexpected = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert unexpected.status_code == 500 and "secret" not in _openai_error(unexpected)["message"]
        engine.close()
        engine.worker.join(10)
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["worker"] == "stopped"
        refused = httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": "x"}, timeout=30)
        assert refused.status_code == 503 and "worker" in _openai_error(refused)["message"]


def test_serve_flags_reach_the_server(runs):
    from tunesmith.cli import build_parser

    args = build_parser().parse_args(
        ["serve", str(runs[0]), "--max-body-bytes", "1000", "--max-prompt-tokens", "50", "--docs", "--queue-size", "3"]
    )
    assert (args.max_body_bytes, args.max_prompt_tokens, args.docs, args.queue_size) == (1000, 50, True, 3)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", str(runs[0]), "--queue-size", "0"])


def test_a_host_the_server_was_not_started_for_gets_421_naming_allow_host(server, runs, tmp_path):
    url, _, _ = server
    port = url.rsplit(":", 1)[1]
    ask = "GET /v1/models HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer " + KEY + "\r\nConnection: close\r\n\r\n"
    # A page on attacker.example whose name now points at 127.0.0.1 sends its own name.
    status, _, body = _raw(url, ask.format(f"attacker.example:{port}").encode())
    assert status == 421 and "--allow-host attacker.example" in json.loads(body)["error"]["message"]
    for name in ("127.0.0.1", "localhost", "LocalHost", "[::1]"):
        assert _raw(url, ask.format(f"{name}:{port}").encode())[0] == 200, name
    from starlette.testclient import TestClient

    from tunesmith.deploy.guard import allowed_hosts

    engine = Engine(runs[:1])
    app = create_app(engine, RequestLog(tmp_path / "r.sqlite"), hosts=allowed_hosts("0.0.0.0", ["box.lan"]))
    assert TestClient(app, base_url="http://box.lan:8000").get("/v1/models").status_code == 200
    assert TestClient(app, base_url="http://10.0.0.7:8000").get("/v1/models").status_code == 421
    engine.close()


def test_serve_flags_allow_hosts_and_browser_origins(runs, monkeypatch):
    from starlette.testclient import TestClient

    apps = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: apps.append(app))
    argv = ["serve", str(runs[0]), "--host", "0.0.0.0", "--allow-host", "box.lan", "--allow-host", "10.0.0.7"]
    assert main([*argv, "--cors-origin", "http://app.example:3000/", "--quiet"]) == 0
    for name, status in (("box.lan", 200), ("10.0.0.7", 200), ("127.0.0.1", 200), ("other.lan", 421)):
        assert TestClient(apps[0], base_url=f"http://{name}:8000").get("/v1/models").status_code == status, name
    browser = TestClient(apps[0], base_url="http://box.lan:8000")
    allowed = browser.get("/v1/models", headers={"Origin": "http://app.example:3000"})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://app.example:3000"
    assert browser.get("/v1/models", headers={"Origin": "http://evil.example"}).status_code == 403


def test_a_browser_origin_not_allowed_is_refused_and_an_allowed_one_gets_cors(server, runs, tmp_path):
    url, db, _ = server
    body = {"model": "colours", "messages": [{"role": "user", "content": "colour red"}], "max_tokens": 2}
    headers = {"Authorization": f"Bearer {KEY}"}
    post = lambda **extra: httpx.post(  # noqa: E731
        f"{url}/v1/chat/completions", json=body, headers={**headers, **extra}, timeout=30
    )
    refused = post(Origin="http://evil.example")
    assert refused.status_code == 403 and "--cors-origin http://evil.example" in _openai_error(refused)["message"]
    assert post(Origin="null").status_code == 403  # a sandboxed frame or a file:// page
    assert post().status_code == 200  # curl and the OpenAI clients send no Origin
    assert post(Origin=url).status_code == 200  # this server's own page (e.g. /docs)
    from starlette.testclient import TestClient

    engine = Engine(runs[:1])
    app = create_app(engine, RequestLog(tmp_path / "r.sqlite"), cors_origins=["http://app.example"])
    browser = TestClient(app, base_url="http://127.0.0.1:8000")
    preflight = browser.options(
        "/v1/chat/completions",
        headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"},
    )  # fmt: skip
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "http://app.example"
    assert "x-stainless-os" in preflight.headers["access-control-allow-headers"]
    answered = browser.post("/v1/chat/completions", json=body, headers={"Origin": "http://app.example"})
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == "http://app.example"
    other = browser.options(
        "/v1/chat/completions", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert other.status_code == 403 and "access-control-allow-origin" not in other.headers
    engine.close()


def test_feedback_is_capped_in_size_and_in_rows_per_response(server):
    from tunesmith.deploy import limits

    url, db, _ = server
    reply = client(url).chat.completions.create(model="colours", messages=[{"role": "user", "content": "x"}])
    headers = {"Authorization": f"Bearer {KEY}"}
    post = lambda **fields: httpx.post(f"{url}/v1/feedback", json={"id": reply.id, **fields}, headers=headers)  # noqa: E731
    huge = [post(correction="x" * 3 * 2**20) for _ in range(3)]  # three 3 MiB corrections on one id
    assert [r.status_code for r in huge] == [400] * 3
    assert _openai_error(huge[0])["param"] == "correction" and "65536 bytes" in huge[0].json()["error"]["message"]
    assert post(correction="é" * (limits.MAX_CORRECTION_BYTES // 2 + 1)).status_code == 400  # counted in bytes
    long_comment = post(rating=1, comment="c" * (limits.MAX_COMMENT_BYTES + 1))
    assert long_comment.status_code == 400 and _openai_error(long_comment)["param"] == "comment"
    most = limits.MAX_FEEDBACK_PER_RESPONSE
    kept = [post(rating=1, correction="y" * limits.MAX_CORRECTION_BYTES) for _ in range(most)]
    assert [r.status_code for r in kept] == [200] * most
    full = post(rating=5)
    assert full.status_code == 409 and _openai_error(full)["param"] == "id"
    assert f"{limits.MAX_FEEDBACK_PER_RESPONSE} feedback" in full.json()["error"]["message"]
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT COUNT(*) FROM feedback WHERE request_id=?", (reply.id,)).fetchone()[0]
    assert rows == limits.MAX_FEEDBACK_PER_RESPONSE


ASKING = {
    "logprobs": True,
    "top_logprobs": 3,
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": "required",
    "response_format": {"type": "json_object"},
    "logit_bias": {"5": 10},
    "presence_penalty": 0.5,
    "frequency_penalty": -1.0,
}


@pytest.mark.parametrize("name", list(ASKING))
def test_openai_fields_not_implemented_are_refused_naming_the_field(server, name):
    url, _, _ = server
    body = {"model": "colours", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, name: ASKING[name]}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400 and _openai_error(response)["param"] == name
    assert f"'{name}'" in response.json()["error"]["message"]


def test_openai_fields_that_ask_for_nothing_are_accepted(server):
    url, _, _ = server
    harmless = {"logprobs": False, "top_logprobs": 0, "tools": [], "tool_choice": "none", "logit_bias": {},
                "response_format": {"type": "text"}, "presence_penalty": 0, "frequency_penalty": 0.0}  # fmt: skip
    body = {"model": "colours", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **harmless}
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers).status_code == 200
    completion = {"model": "base", "prompt": "colour", "max_tokens": 2}
    silent = httpx.post(f"{url}/v1/completions", json={**completion, "logprobs": None}, headers=headers)
    assert silent.status_code == 200
    asking = httpx.post(f"{url}/v1/completions", json={**completion, "logprobs": 2}, headers=headers)
    assert asking.status_code == 400 and _openai_error(asking)["param"] == "logprobs"


def test_a_stream_asked_to_include_usage_ends_with_a_usage_chunk(server):
    url, _, _ = server
    api = client(url)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    chunks = list(api.chat.completions.create(model="colours", messages=messages, max_tokens=4, stream=True,
                                              stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason in ("stop", "length") and chunks[-2].usage is None
    texts = list(api.completions.create(model="base", prompt="colour", max_tokens=3, stream=True,
                                        stream_options={"include_usage": True}))  # fmt: skip
    assert texts[-1].choices == [] and texts[-1].usage.completion_tokens >= 1


def test_a_chat_stream_opens_with_the_assistant_role_even_when_nothing_is_generated(runs, tmp_path):
    engine = Engine(runs[:1])
    served = engine.models["colours"]
    served.stop_ids = list(range(len(served.tokenizer)))  # whatever comes first ends the answer, empty
    app = create_app(engine, RequestLog(tmp_path / "r.sqlite"), default_max_tokens=4)
    with running(app) as url:
        body = {"model": "colours", "messages": [{"role": "user", "content": "x"}], "stream": True}
        text = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).text
    engine.close()
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and len(events) == 2
    assert text.rstrip().endswith("data: [DONE]")


def test_the_vllm_hand_off_passes_the_api_key_in_the_environment_not_the_command_line(runs, monkeypatch, capsys):
    launched = []
    monkeypatch.setattr("tunesmith.deploy.vllm.vllm_available", lambda: True)
    monkeypatch.setattr("os.execvp", lambda file, argv: launched.append((argv, None)))
    monkeypatch.setattr("os.execvpe", lambda file, argv, env: launched.append((argv, env)))
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert main(["serve", str(runs[0]), "--engine", "vllm", "--api-key", "s3cret", "--cors-origin", "http://a.b"]) == 0
    ((command, env),) = launched
    assert not any("s3cret" in part for part in command) and "--api-key" not in command
    assert env is not None and env["VLLM_API_KEY"] == "s3cret" and env["PATH"]
    assert command[command.index("--allowed-origins") + 1] == '["http://a.b"]'  # vLLM's own default is any origin
    assert "s3cret" not in capsys.readouterr().err


def test_closing_an_engine_answers_the_requests_still_waiting_and_refuses_new_ones(runs):
    from tunesmith.deploy.engine import Stopped

    engine = Engine(runs[:1], max_batch=1)
    release, generating = threading.Event(), threading.Event()
    generate = engine._generate
    engine._generate = lambda jobs: (generating.set(), release.wait(20), generate(jobs))[2]
    served = engine.models["colours"]
    events: dict[str, list] = {"first": [], "second": []}
    first = Job(served, [1, 2, 3], 2, 0.0, 1.0, [], 0, lambda kind, value: events["first"].append(kind))
    second = Job(served, [1, 2, 3], 2, 0.0, 1.0, [], 0, lambda kind, value: events["second"].append((kind, value)))
    engine.submit(first)
    assert generating.wait(20)  # the worker holds the first; the second waits behind it
    engine.submit(second)
    engine.close()
    assert events["second"] and events["second"][0][0] == "error" and "unloaded" in events["second"][0][1]
    with pytest.raises(Stopped):
        engine.submit(Job(served, [1], 1, 0.0, 1.0, [], 0, lambda kind, value: None))
    release.set()
    engine.worker.join(20)
    assert events["first"][-1] == "done"  # what was generating when it closed still finishes
