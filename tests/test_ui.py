"""`tunesmith ui`: its guard (token, Host, Origin, paths) through HTTP, and the whole process in a real headless
Chromium (Debian's, driven by Playwright; nothing is downloaded): runs, a live run stopped and resumed, the data
review by keyboard, the comparison, the playground. Screenshots of each page land in the test's tmp dir."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.compare_v1 import write_version_1_comparison
from tests.conftest import chat_records, write_jsonl

TOKEN = "test-token-0123456789"


@pytest.fixture
def folders(tmp_path):
    runs, data = tmp_path / "runs", tmp_path / "data"
    runs.mkdir()
    data.mkdir()
    write_jsonl(data / "chat.jsonl", chat_records(40))
    (tmp_path / "secret.jsonl").write_text('{"text": "not yours"}\n')
    run = runs / "old"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"status": "completed", "started": "2026-01-01T00:00:00"}))
    (run / "config.yaml").write_text("name: old\nmodel: m\nmethod: lora\ntrain: {max_steps: 4}\n")
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"type": "train", "step": s, "loss": 2.0 / s, "tokens_per_s": 100.0}) + "\n" for s in (1, 2))
    )
    return runs, data


@pytest.fixture
def client(folders):
    from starlette.testclient import TestClient

    from tunesmith.ui.app import create_app

    runs, data = folders
    app = create_app(runs, data, TOKEN, port=8765)
    return TestClient(app, base_url="http://127.0.0.1:8765")


AUTH = {"Authorization": f"Bearer {TOKEN}"}
ORIGIN = {"Origin": "http://127.0.0.1:8765"}


def test_token_is_required_and_the_link_sets_a_strict_cookie(client):
    assert client.get("/").status_code == 401
    assert client.get("/api/runs").status_code == 401
    assert client.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/?token=wrong", follow_redirects=False).status_code == 401
    opened = client.get(f"/?token={TOKEN}", follow_redirects=False)
    assert opened.status_code == 303 and opened.headers["location"] == "/"
    cookie = opened.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert client.get("/api/runs").status_code == 200  # the cookie now carries the token
    runs = client.get("/api/runs").json()["runs"]
    assert [r["name"] for r in runs] == ["old"] and runs[0]["progress"] == 1.0 and runs[0]["tokens_per_s"] == 100.0


def test_a_name_given_with_allow_host_is_served_and_the_refusal_says_how(folders):
    from starlette.testclient import TestClient

    from tunesmith.ui.app import create_app

    runs, data = folders
    app = create_app(runs, data, TOKEN, hosts={"0.0.0.0", "box.lan"}, port=8765)
    client = TestClient(app, base_url="http://box.lan:8765")
    assert client.get("/api/runs", headers=AUTH | {"Host": "box.lan:8765"}).status_code == 200
    refused = client.get("/api/runs", headers=AUTH | {"Host": "192.168.1.5:8765"})
    assert refused.status_code == 421 and "--allow-host 192.168.1.5" in refused.text


def test_other_hosts_and_origins_are_refused(client):
    # DNS rebinding: another name pointed at 127.0.0.1 still says its own name in Host.
    assert client.get("/api/runs", headers=AUTH | {"Host": "attacker.example:8765"}).status_code == 421
    assert client.get("/api/runs", headers=AUTH | {"Host": "localhost:8765"}).status_code == 200
    # CSRF: another page's request carries its Origin (and, SameSite=Strict, no cookie); a write needs ours.
    body = {"path": "chat.jsonl"}
    evil = {"Origin": "http://attacker.example"}
    assert client.post("/api/review/apply", json=body, headers=AUTH | evil).status_code == 403
    assert client.post("/api/review/apply", json=body, headers=AUTH).status_code == 403  # no Origin at all
    assert client.get("/api/runs", headers=AUTH | evil).status_code == 403
    assert client.post("/api/runs/old/stop", headers=AUTH | ORIGIN).status_code == 400  # past the guard: not running


@pytest.mark.parametrize(
    "path", ["../secret.jsonl", "/etc/passwd", "%2e%2e/secret.jsonl", "link/secret.jsonl", "linked.jsonl"]
)
def test_no_request_path_leaves_the_folders(client, folders, path):
    runs, data = folders
    (data / "link").symlink_to(data.parent, target_is_directory=True)
    (data / "linked.jsonl").symlink_to(data.parent / "secret.jsonl")
    answer = client.get("/api/data/check", params={"path": path}, headers=AUTH)
    assert answer.status_code in (403, 404) and "not yours" not in answer.text
    verdict = {"path": path, "hash": "x", "verdict": "accept"}
    assert client.post("/api/review/verdict", json=verdict, headers=AUTH | ORIGIN).status_code in (403, 404)


def test_run_names_and_static_files_stay_inside(client):
    assert client.get("/api/runs/..%2F..%2Fetc", headers=AUTH).status_code in (400, 404)
    assert client.get("/api/runs/.tunesmith-ui", headers=AUTH).status_code == 400
    assert client.get("/static/..%2F..%2Fapp.py", headers=AUTH).status_code in (403, 404)
    assert client.get("/static/vendor/uplot/LICENSE", headers=AUTH).status_code == 200
    form = {"fields": {"name": "x", "data.path": "../secret.jsonl", "model": "gemma-3-270m"}}
    assert client.post("/api/prepare", json=form, headers=AUTH | ORIGIN).status_code == 403
    form = {"fields": {"name": "x", "data.path": "chat.jsonl", "model": "/etc"}}
    assert client.post("/api/prepare", json=form, headers=AUTH | ORIGIN).status_code == 403
    form = {"fields": {"name": "../x", "data.path": "chat.jsonl", "model": "gemma-3-270m"}}
    assert client.post("/api/launch", json=form, headers=AUTH | ORIGIN).status_code == 400


def test_review_verdicts_go_to_the_same_file_as_the_cli(client, folders):
    from tunesmith.data.review import load_verdicts, sample_items, summarise

    _, data = folders
    items = client.get("/api/review", params={"path": "chat.jsonl", "sample": 6}, headers=AUTH).json()["items"]
    assert [i["hash"] for i in items] == [i.hash for i in sample_items(data / "chat.jsonl", 6, 42)]  # the CLI's sample
    for item, verdict in zip(items[:3], ["accept", "reject", "edit"], strict=True):
        body = {"path": "chat.jsonl", "hash": item["hash"], "verdict": verdict, "sample": 6, "edited": "{}"}
        assert client.post("/api/review/verdict", json=body, headers=AUTH | ORIGIN).status_code == 200
    saved = load_verdicts(data / "chat.jsonl")
    assert [saved[i["hash"]]["verdict"] for i in items[:3]] == ["accept", "reject", "edit"]
    assert summarise(data / "chat.jsonl", sample_items(data / "chat.jsonl", 6, 42)).reviewed == 3
    applied = client.post("/api/review/apply", json={"path": "chat.jsonl"}, headers=AUTH | ORIGIN).json()
    assert applied["written"] == "chat.reviewed.jsonl"
    assert len((data / "chat.reviewed.jsonl").read_text().splitlines()) == 39


def test_every_answer_forbids_framing_and_a_static_folder_is_not_found(client):
    for answer in (client.get("/", headers=AUTH), client.get("/api/runs"), client.get("/static/app.js", headers=AUTH)):
        policy = answer.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy and "default-src 'self'" in policy
        assert answer.headers["x-frame-options"] == "DENY"
    assert client.get("/static/vendor", headers=AUTH).status_code == 404
    assert client.get("/static/vendor/", headers=AUTH).status_code == 404


def test_bodies_notes_and_data_files_are_capped(client, folders, monkeypatch):
    from tunesmith.ui import app

    item = client.get("/api/review", params={"path": "chat.jsonl", "sample": 6}, headers=AUTH).json()["items"][0]
    verdict = {"path": "chat.jsonl", "hash": item["hash"], "verdict": "accept", "sample": 6}
    long_note = verdict | {"note": "x" * (app.MAX_NOTE_CHARS + 1)}
    assert client.post("/api/review/verdict", json=long_note, headers=AUTH | ORIGIN).status_code == 422
    huge = verdict | {"note": "x" * (app.MAX_BODY_BYTES + 1)}
    refused = client.post("/api/review/verdict", json=huge, headers=AUTH | ORIGIN)
    assert refused.status_code == 413 and "limit" in refused.json()["error"]
    assert not (folders[1] / "chat.review.jsonl").exists()  # nothing recorded from either
    monkeypatch.setattr(app, "MAX_DATA_BYTES", 100)
    too_big = client.get("/api/data/check", params={"path": "chat.jsonl"}, headers=AUTH)
    assert too_big.status_code == 413 and "tunesmith data check" in too_big.json()["error"]


def test_the_file_list_skips_hidden_folders_and_stops_early(tmp_path, monkeypatch):
    from tunesmith.ui import app

    for folder in (".venv", "a", "b", ".tunesmith-ui", "model"):
        (tmp_path / folder).mkdir()
    for i in range(6):
        (tmp_path / "a" / f"{i}.jsonl").write_text("{}\n")
    for name in (".venv/hidden.jsonl", "b/late.jsonl", ".tunesmith-ui/q.json", "model/config.json", "top.csv"):
        (tmp_path / name).write_text("{}\n")
    listed = [f["path"] for f in app.list_data_files(tmp_path)]
    assert listed == [*(f"a/{i}.jsonl" for i in range(6)), "b/late.jsonl", "top.csv"]
    monkeypatch.setattr(app, "MAX_LISTED_FILES", 3)
    assert len(app.list_data_files(tmp_path)) == 3
    monkeypatch.setattr(app, "MAX_LISTED_FILES", 500)
    monkeypatch.setattr(app, "MAX_WALKED_ENTRIES", 4)  # the top folder's entries already reach it: no subfolder
    assert [f["path"] for f in app.list_data_files(tmp_path)] == ["top.csv"]


def test_a_non_finite_metric_reaches_the_page_as_null(client, folders):
    runs, _ = folders
    with (runs / "old" / "metrics.jsonl").open("a") as handle:
        handle.write('{"type": "train", "step": 3, "loss": 0.5, "grad_norm": Infinity}\n')
    answer = client.get("/api/runs/old", headers=AUTH)
    assert answer.status_code == 200 and "Infinity" not in answer.text
    assert answer.json()["metrics"][-1]["grad_norm"] is None


def test_a_comparison_written_before_version_2_reaches_the_page_in_the_new_shape(client, folders):
    runs, _ = folders
    old = write_version_1_comparison(runs / "old")
    assert client.get("/api/runs", headers=AUTH).json()["runs"][0]["compared"] is True
    comparison = client.get("/api/runs/old", headers=AUTH).json()["comparison"]
    assert comparison["version"] == 2 and comparison["strongest"] == "few_shot" and "metrics" not in comparison
    zero, few = comparison["baselines"]["zero_shot"], comparison["baselines"]["few_shot"]
    assert zero["metrics"] == old["metrics"] and few["metrics"] == old["few_shot"]["metrics"]
    assert (zero["label"], few["label"]) == ("zero-shot", "3-shot")
    assert zero["flipped"]["fixed"][0]["zero_shot"] == "old zero-shot answer"
    assert set(comparison["seconds"]) == {"zero_shot", "few_shot", "tuned", "choosing the strongest baseline"}


# --- objective grpo on the run page ------------------------------------------------------------------------------

GRPO_RECORDS = [
    {"type": "train", "step": 1, "loss": 0.1, "reward": 0.2, "reward_std": 0.1},
    {"type": "train", "step": 2, "loss": 0.1, "reward": 0.4, "reward_std": 0.2},
    {"type": "val", "step": 2, "val_reward": 0.5,
     "val_samples": [{"prompt": "colour red", "completion": '{"colour": "red"}', "reward": 1.0},
                     {"prompt": "colour blue", "completion": "<b>", "reward": None}]},
    {"type": "train", "step": 3, "loss": 0.1, "reward": 0.9, "reward_std": 0.0},
    {"type": "train", "step": 3, "loss": 0.1, "reward": 0.6, "reward_std": 0.1},  # a resume wrote step 3 again
    {"type": "event", "step": 3, "event": "checkpoint"},
]  # fmt: skip


def _run_rl_js(records):
    """static/rl.js run in node on these records: what the run page would chart and list."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    from tunesmith.ui.app import STATIC

    script = (
        f"const rl = require({json.dumps(str(STATIC / 'rl.js'))}); const s = rl.empty();"
        f"for (const r of {json.dumps(records)}) rl.add(s, r);"
        "console.log(JSON.stringify({seen: rl.seen(s), data: rl.chartData(s), rows: rl.sampleRows(s)}));"
    )
    done = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_run_page_charts_the_reward_beside_the_loss_and_lists_the_sample_completions():
    shown = _run_rl_js(GRPO_RECORDS)
    steps, mean, low, high, val = shown["data"]
    assert steps == [1, 2, 3] and mean == [0.2, 0.4, 0.6]  # the resumed step 3 replaces the first one
    assert low == pytest.approx([0.1, 0.2, 0.5]) and high == pytest.approx([0.3, 0.6, 0.7])
    assert val == [None, 0.5, None] and shown["seen"]
    assert shown["rows"] == [["colour red", '{"colour": "red"}', 1.0], ["colour blue", "<b>", "skipped"]]
    sft = _run_rl_js([{"type": "train", "step": 1, "loss": 1.0}, {"type": "val", "step": 1, "val_loss": 0.9}])
    assert not sft["seen"] and sft["rows"] == []  # a run without rewards gets no reward chart


def test_the_page_loads_the_reward_script_as_a_file_and_the_run_api_passes_rewards_and_samples(client, folders):
    page = client.get("/", headers=AUTH).text
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page, re.S)
    assert all('src="/static/' in attrs and not body.strip() for attrs, body in scripts)  # no inline script (CSP)
    sources = [re.search(r'src="([^"]+)"', attrs).group(1) for attrs, _ in scripts]
    assert sources.index("/static/rl.js") < sources.index("/static/app.js")  # app.js uses what rl.js defines
    served = client.get("/static/rl.js", headers=AUTH)
    assert served.status_code == 200 and "javascript" in served.headers["content-type"]
    runs, _ = folders
    write_jsonl(runs / "old" / "metrics.jsonl", GRPO_RECORDS)
    records = client.get("/api/runs/old", headers=AUTH).json()["metrics"]
    assert records[2]["val_samples"][1] == {"prompt": "colour blue", "completion": "<b>", "reward": None}
    assert [r.get("reward") for r in records if r["type"] == "train"] == [0.2, 0.4, 0.9, 0.6]


# --- The real browser ---------------------------------------------------------------------------------------------


def _chromium() -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (`make browser` installs Debian's chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    return browser


@pytest.fixture
def ui_server(tmp_path, tiny_model_dir):
    """`tunesmith ui` as a user starts it, in its own process; yields its address with the token."""
    runs, data = tmp_path / "runs", tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "chat.jsonl", chat_records(40))
    shutil.copytree(tiny_model_dir, data / "tiny-model")
    command = [sys.executable, "-m", "tunesmith", "ui", "--runs", str(runs), "--data", str(data), "--no-browser"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = None
    lines = []
    deadline = time.monotonic() + 60
    while url is None and time.monotonic() < deadline:
        line = server.stdout.readline()
        lines.append(line)
        found = re.search(r"Open (http://\S+)", line)
        url = found and found.group(1)
    assert url, "".join(lines)
    yield url, runs, data
    server.terminate()
    server.wait(timeout=20)
    for launches in (runs / ".tunesmith-ui").glob("launches.json"):
        for launch in json.loads(launches.read_text()).values():
            if launch.get("exit_code") is not None:
                continue  # ended while the UI watched it: its pid may belong to another process by now
            try:
                os.kill(launch["pid"], 9)  # a run this test launched and left behind
            except (ProcessLookupError, KeyError, TypeError):
                pass


@pytest.mark.slow
def test_the_whole_process_in_a_real_browser(ui_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    browser_path = _chromium()
    url, runs, data = ui_server
    shots = tmp_path / "shots"
    shots.mkdir()
    base = url.split("/?")[0]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"], headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(30_000)
        expect.set_options(timeout=120_000)
        refused = []  # anything the Content-Security-Policy blocked: the UI must need nothing it forbids
        page.on("console", lambda message: "Content Security Policy" in message.text and refused.append(message.text))
        page.goto(url)  # the token link: sets the cookie, lands on Runs
        expect(page.locator("main[data-page=runs]")).to_be_visible()
        expect(page.get_by_text("No runs yet")).to_be_visible()
        page.screenshot(path=shots / "runs-empty.png")

        # New run: the form's settings with their help, then data check and plan, then launch.
        page.goto(f"{base}/#/new")
        page.select_option("select[name='data.path']", "chat.jsonl")
        page.select_option("select[name=model]", "tiny-model")
        page.fill("input[name=name]", "ui-run")
        page.fill("input[name='train.max_steps']", "150")
        page.fill("input[name='train.batch_size']", "2")
        page.fill("input[name='validation.every']", "50")
        page.select_option("select[name='data.allow_warnings']", "true")
        page.click("#prepare-btn")
        expect(page.locator("#prepare")).to_contain_text("40 examples")
        expect(page.locator("#prepare")).to_contain_text("peak memory")
        expect(page.locator("#launch")).to_be_enabled()
        page.screenshot(path=shots / "new-run.png", full_page=True)
        page.click("#launch")

        # The run: the curve gains points while it trains (server-sent events, no reload), then stop and resume.
        expect(page.locator("#run-status")).to_contain_text("running")
        points = page.locator("#points")
        expect(points).not_to_have_text("0")
        first = int(points.inner_text())
        deadline = time.monotonic() + 120  # polled from here: the page's policy refuses the eval wait_for_function uses
        while int(points.inner_text()) <= first + 5 and time.monotonic() < deadline:
            time.sleep(0.25)
        assert int(points.inner_text()) > first + 5
        page.screenshot(path=shots / "run-live.png", full_page=True)
        page.click("#stop")
        expect(page.locator("#run-status")).to_contain_text("interrupted")
        stopped_at = int(points.inner_text())
        assert 0 < stopped_at < 150
        manifest = json.loads((runs / "ui-run" / "manifest.json").read_text())
        assert manifest["status"] == "interrupted"
        page.click("#resume")
        expect(page.locator("#run-status")).to_contain_text("completed", timeout=300_000)
        expect(points).to_have_text("150")  # one point per step: the resumed run continued the same curve
        page.screenshot(path=shots / "run-done.png", full_page=True)

        # Runs page lists it; the comparison (written by `tunesmith run` after training) opens with its CI column.
        page.goto(f"{base}/#/runs")
        expect(page.locator("table")).to_contain_text("ui-run")
        page.screenshot(path=shots / "runs.png", full_page=True)
        deadline = time.monotonic() + 300
        while not (runs / "ui-run" / "eval" / "compare.json").is_file() and time.monotonic() < deadline:
            time.sleep(1)
        page.goto(f"{base}/#/compare/ui-run")
        expect(page.locator("#verdict")).to_be_visible()
        expect(page.locator("th", has_text="95% CI").first).to_be_visible()
        page.screenshot(path=shots / "compare.png", full_page=True)

        # Data: the check report, then five verdicts by keyboard, found in the review file the CLI reads.
        page.goto(f"{base}/#/data?file=chat.jsonl")
        expect(page.get_by_text("40 examples, format chat")).to_be_visible()
        page.click("#review-start")
        expect(page.locator("#review-item")).to_be_visible()
        page.keyboard.press("a")
        expect(page.locator("#review-progress")).to_contain_text("1 of")
        page.keyboard.press("r")
        expect(page.locator("#review-progress")).to_contain_text("2 of")
        page.keyboard.press("n")
        page.keyboard.type("checked twice")
        page.keyboard.press("Enter")
        page.keyboard.press("a")
        expect(page.locator("#review-progress")).to_contain_text("3 of")
        page.keyboard.press("s")  # skipped: no verdict
        page.keyboard.press("e")
        page.keyboard.press("Control+a")
        page.keyboard.type('{"colour": "edited"}')
        page.keyboard.press("Control+Enter")
        expect(page.locator("#review-progress")).to_contain_text("4 of")
        page.keyboard.press("a")
        expect(page.locator("#review-progress")).to_contain_text("5 of")
        page.screenshot(path=shots / "data-review.png", full_page=True)
        from tunesmith.data.review import load_verdicts

        verdicts = load_verdicts(data / "chat.jsonl")
        assert sorted(v["verdict"] for v in verdicts.values()) == ["accept", "accept", "accept", "edit", "reject"]
        assert any(v["note"] == "checked twice" for v in verdicts.values())
        assert any(v["edited_answer"] == '{"colour": "edited"}' for v in verdicts.values())

        # Playground: the base and the tuned run answer the same prompt side by side, streamed.
        page.goto(f"{base}/#/play")
        page.fill("#prompt", "colour red item 3")
        page.click("#send")
        expect(page.locator("#answers .card[data-done='1']")).to_have_count(2)
        page.screenshot(path=shots / "playground.png", full_page=True)
        browser.close()
    assert refused == []
    for shot in shots.iterdir():
        assert shot.stat().st_size > 10_000, shot


def test_requests_waiting_for_a_playground_model_never_hold_the_threads_other_pages_use(monkeypatch, tmp_path):
    import asyncio
    import threading
    from types import SimpleNamespace

    from tunesmith.deploy.engine import Result
    from tunesmith.ui import playground

    loaded = threading.Event()

    class SlowEngine:  # loading takes until the test says so
        alive, max_prompt_tokens, context_limit = True, 16, 64

        def __init__(self, runs):
            loaded.wait(30)
            self.models = {"base": SimpleNamespace(tokenizer=None)}

        def submit(self, job):
            job.emit("done", Result("hi", 2, 1, "stop", 0.0))

        def close(self):
            pass

    monkeypatch.setattr(playground, "Engine", SlowEngine)
    monkeypatch.setattr(playground, "engine_key", lambda path: "base:m")
    monkeypatch.setattr("tunesmith.data.tokenize.prompt_ids", lambda tokenizer, conversation: [1, 2])
    crowd = min(32, (os.cpu_count() or 1) + 4) + 2  # more than asyncio's default thread pool holds

    async def scene() -> list:
        play = playground.Playground()
        chats = [
            asyncio.create_task(play.answer([tmp_path], "base", [{"role": "user", "content": "x"}], 4, 0.0))
            for _ in range(crowd)
        ]
        await asyncio.sleep(0.3)
        other_page = await asyncio.wait_for(asyncio.to_thread(lambda: "served"), timeout=5)
        loaded.set()
        answers = []
        for chat in chats:
            answers.append([event async for event in await chat])
        play.close()
        return [other_page, answers]

    other_page, answers = asyncio.run(scene())
    assert other_page == "served"
    assert all(events == [("done", {"tokens": 1, "finish": "stop"})] for events in answers)
