"""What `tunesmith serve` refuses: a missing key, foreign Host and Origin headers, oversized bodies, prompts
and feedback."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.serve_helpers import KEY, client, openai_error, raw, running
from tunesmith.cli import main
from tunesmith.deploy.engine import Engine
from tunesmith.deploy.requestlog import RequestLog
from tunesmith.deploy.serve import create_app
from tunesmith.errors import TunesmithError

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


def test_api_key_is_required(server):
    url, _, _ = server
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").models.list()
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").json()["status"] == "ok"  # health needs no key


def test_auth_is_decided_on_the_routed_path_and_nothing_private_leaks(server, runs, monkeypatch):
    from starlette.datastructures import URL
    from starlette.requests import HTTPConnection

    url, _, app = server
    # A Host header with a path in it made the URL that Starlette < 1.0.1 rebuilt look like /health; it is not a
    # name this server answers to, so it is refused before the key is even looked at.
    for host in ("127.0.0.1/health?", "127.0.0.1/metrics#"):
        status, _, body = raw(url, f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
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


def test_a_host_the_server_was_not_started_for_gets_421_naming_allow_host(server, runs, tmp_path):
    url, _, _ = server
    port = url.rsplit(":", 1)[1]
    ask = "GET /v1/models HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer " + KEY + "\r\nConnection: close\r\n\r\n"
    # A page on attacker.example whose name now points at 127.0.0.1 sends its own name.
    status, _, body = raw(url, ask.format(f"attacker.example:{port}").encode())
    assert status == 421 and "--allow-host attacker.example" in json.loads(body)["error"]["message"]
    for name in ("127.0.0.1", "localhost", "LocalHost", "[::1]"):
        assert raw(url, ask.format(f"{name}:{port}").encode())[0] == 200, name
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
    assert refused.status_code == 403 and "--cors-origin http://evil.example" in openai_error(refused)["message"]
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


def test_oversized_bodies_get_413_before_they_are_read(runs, tmp_path):
    engine = Engine(runs[:1])
    app = create_app(engine, RequestLog(tmp_path / "r.sqlite"), default_max_tokens=2, max_body_bytes=1000)
    post = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    with running(app) as url:
        started = time.perf_counter()
        status, headers, body = raw(url, (post + "Content-Length: 30000000\r\n\r\n{").encode())  # 1 byte of 30 MB
        assert status == 413 and time.perf_counter() - started < 5
        assert headers["connection"] == "close" and "1000 bytes" in json.loads(body)["error"]["message"]
        chunks = b"".join(b"%x\r\n%s\r\n" % (600, b" " * 600) for _ in range(2)) + b"0\r\n\r\n"
        status, _, body = raw(url, (post + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunks)
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
    assert reply.status_code == 400 and openai_error(reply)["param"] == "messages"
    assert "--max-prompt-tokens" in reply.json()["error"]["message"]


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
        assert refused.status_code == 400 and openai_error(refused)["param"] == "messages"
        assert "at most 16" in refused.json()["error"]["message"]
    engine.close()
    engine = Engine([run], max_prompt_tokens=200)
    app = create_app(engine, RequestLog(tmp_path / "b.sqlite"), max_tokens_limit=1000, default_max_tokens=2)
    with running(app) as url:
        assert httpx.post(f"{url}/v1/chat/completions", json=long_prompt, timeout=30).status_code == 200
        too_long = httpx.post(f"{url}/v1/chat/completions", json={**long_prompt, "max_tokens": 500}, timeout=30)
        assert too_long.status_code == 400 and "context of 512" in openai_error(too_long)["message"]
    engine.close()
    with pytest.raises(TunesmithError, match="--max-prompt-tokens 512"):
        Engine([run], max_prompt_tokens=512)


def test_feedback_is_capped_in_size_and_in_rows_per_response(server):
    from tunesmith.deploy import limits

    url, db, _ = server
    reply = client(url).chat.completions.create(model="colours", messages=[{"role": "user", "content": "x"}])
    headers = {"Authorization": f"Bearer {KEY}"}
    post = lambda **fields: httpx.post(f"{url}/v1/feedback", json={"id": reply.id, **fields}, headers=headers)  # noqa: E731
    huge = [post(correction="x" * 3 * 2**20) for _ in range(3)]  # three 3 MiB corrections on one id
    assert [r.status_code for r in huge] == [400] * 3
    assert openai_error(huge[0])["param"] == "correction" and "65536 bytes" in huge[0].json()["error"]["message"]
    assert post(correction="é" * (limits.MAX_CORRECTION_BYTES // 2 + 1)).status_code == 400  # counted in bytes
    long_comment = post(rating=1, comment="c" * (limits.MAX_COMMENT_BYTES + 1))
    assert long_comment.status_code == 400 and openai_error(long_comment)["param"] == "comment"
    most = limits.MAX_FEEDBACK_PER_RESPONSE
    kept = [post(rating=1, correction="y" * limits.MAX_CORRECTION_BYTES) for _ in range(most)]
    assert [r.status_code for r in kept] == [200] * most
    full = post(rating=5)
    assert full.status_code == 409 and openai_error(full)["param"] == "id"
    assert f"{limits.MAX_FEEDBACK_PER_RESPONSE} feedback" in full.json()["error"]["message"]
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT COUNT(*) FROM feedback WHERE request_id=?", (reply.id,)).fetchone()[0]
    assert rows == limits.MAX_FEEDBACK_PER_RESPONSE
