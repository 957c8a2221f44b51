"""The `tunesmith serve` command: its flags, a real process answering the OpenAI client, the vLLM hand-off."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.serve_helpers import KEY, PROMPTS, client, free_port, reference, run_with_template
from tests.test_tools import MISTRAL_CALLS, NATIVE
from tunesmith.cli import main
from tunesmith.data.tools import with_tools_block

pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


def test_serve_flags_reach_the_server(runs):
    from tunesmith.cli import build_parser

    args = build_parser().parse_args(
        ["serve", str(runs[0]), "--max-body-bytes", "1000", "--max-prompt-tokens", "50", "--docs", "--queue-size", "3"]
    )
    assert (args.max_body_bytes, args.max_prompt_tokens, args.docs, args.queue_size) == (1000, 50, True, 3)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", str(runs[0]), "--queue-size", "0"])


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


@pytest.mark.parametrize(
    ("name", "template", "parser"),
    [("hermes", with_tools_block, "hermes"), ("mistral", lambda _: NATIVE.replace("CALL_", MISTRAL_CALLS), "mistral")],
)
def test_vllm_is_given_the_tool_call_parser_of_the_runs_template(runs, tmp_path, capsys, name, template, parser):
    run = run_with_template(runs[0], tmp_path, name, template)
    assert main(["serve", str(run), "--engine", "vllm", "--dry-run"]) == 0
    command = capsys.readouterr().out.replace("\n", "")
    assert f"--chat-template {run / 'chat_template.jinja'} --enable-auto-tool-choice --tool-call-parser {parser} " in (
        command
    )
    assert main(["serve", str(runs[0]), "--engine", "vllm", "--dry-run"]) == 0  # no tools block, no tool options
    assert "--tool-call-parser" not in capsys.readouterr().out


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


@pytest.mark.slow
def test_tunesmith_serve_command_answers_the_openai_client(lora_run, tmp_path):
    port = free_port()
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
        assert reply.choices[0].message.content.strip() == reference(lora_run, PROMPTS[0])
        assert Path(log).is_file()
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
