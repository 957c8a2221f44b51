"""The OpenAI-compatible server, its request log and metrics, monitoring and the vLLM hand-off."""

from __future__ import annotations

import json
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
from tunesmith.deploy.engine import Engine
from tunesmith.deploy.requestlog import RequestLog
from tunesmith.deploy.serve import create_app

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
        release.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200
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
    run = runs[0]
    config_text = (run / "config.yaml").read_text()
    try:
        (run / "config.yaml").write_text(config_text.replace("- exact_match", "- exact_match\n  - json_valid", 1))
        report = monitor_report(run, db)
    finally:
        (run / "config.yaml").write_text(config_text)
    assert report["format"]["json_valid"]["failing"] == 2 and report["format"]["json_valid"]["share"] == 0.5
    assert report["traffic"]["errors"] == 1 and report["traffic"]["error_rate"] == 0.2
    assert any("fail json_valid" in alert for alert in report["alerts"])
    assert any("requests failed" in alert for alert in report["alerts"])


def test_vllm_engine_builds_the_command_and_says_how_to_install(runs, capsys, monkeypatch):
    assert main(["serve", *map(str, runs), "--engine", "vllm", "--dry-run", "--port", "9001", "--api-key", "s3"]) == 0
    command = capsys.readouterr().out.replace("\n", "")
    assert command.startswith("vllm serve ") and "--enable-lora" in command
    assert f"colours={runs[0] / 'adapter'}" in command and f"shades={runs[1] / 'adapter'}" in command
    assert "--max-lora-rank 16" in command and "--served-model-name base" in command
    assert f"--chat-template {runs[0] / 'chat_template.jinja'}" in command and "--port 9001" in command
    assert "s3" not in command  # the key is not printed
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
            "tunesmith.cli",
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
