"""`tunesmith serve --engine llamacpp`: the runs' GGUF exports run by llama.cpp behind the same API, answering as
the same export generates offline, streamed as not, logged like every answer."""

from __future__ import annotations

import sqlite3

import pytest

from tests.serve_helpers import KEY, client, running
from tunesmith.data.formats import Message
from tunesmith.deploy.export import run_tokenizer
from tunesmith.deploy.llamacpp import GgufEngine, GgufModel
from tunesmith.deploy.requestlog import RequestLog
from tunesmith.deploy.serve import create_app
from tunesmith.evaluate.baselines import turn_stops
from tunesmith.evaluate.generate import Asked

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")

PROMPTS = ["colour red item 1", "colour blue item 2"]


def _offline(engine: GgufEngine, run, prompt: str) -> str:
    tokenizer = run_tokenizer(run)
    asked = Asked(tokenizer, [(Message("user", prompt),)], 8, stops=turn_stops(tokenizer))
    GgufModel(engine.files[run.name], context=256).generate(asked.requests[0])
    return asked.answers()[0]


def test_llamacpp_engine_serves_each_run_as_its_export_answers_offline(runs, tmp_path):
    engine = GgufEngine(runs, gguf_type="f32", queue_size=8, max_tokens_limit=32)
    log = RequestLog(tmp_path / "requests.sqlite")
    try:
        assert sorted(engine.models) == ["colours", "shades"] and engine.max_batch == 1
        assert all(path.name.endswith("-f32.gguf") for path in engine.files.values())
        app = create_app(engine, log, api_key=KEY, max_tokens_limit=32, default_max_tokens=8)
        with running(app) as url:
            api = client(url)
            assert sorted(m.id for m in api.models.list()) == ["colours", "shades"]
            for run in runs:
                for prompt in PROMPTS:
                    messages = [{"role": "user", "content": prompt}]
                    reply = api.chat.completions.create(model=run.name, messages=messages, max_tokens=8, temperature=0)
                    text = reply.choices[0].message.content
                    assert text.strip() == _offline(engine, run, prompt)
                    assert reply.usage.completion_tokens <= 8
                    chunks = api.chat.completions.create(
                        model=run.name, messages=messages, max_tokens=8, temperature=0, stream=True
                    )
                    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
            with pytest.raises(Exception, match="base"):
                api.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    finally:
        engine.close()
    with sqlite3.connect(log.path) as db:
        assert db.execute("SELECT COUNT(*) FROM requests WHERE status = 200").fetchone()[0] == 2 * len(PROMPTS) * 2


def test_one_gguf_file_names_one_run(runs, tmp_path):
    from tunesmith.errors import TunesmithError

    with pytest.raises(TunesmithError, match="one run"):
        GgufEngine(runs, gguf=tmp_path / "x.gguf")


@pytest.mark.parametrize("amx", [True, False])
def test_llama_cpp_loads_without_its_amx_repacking_on_an_amx_cpu(monkeypatch, tmp_path, amx):
    import llama_cpp.llama as binding

    from tunesmith.deploy import llamacpp

    seen = {}

    def fake_llama(**arguments):  # llama-cpp-python's Llama reads its defaults while it loads
        seen["extra_buffers"] = binding.llama_cpp.llama_model_default_params().use_extra_bufts
        seen["arguments"] = arguments
        return "model"

    default = binding.llama_cpp.llama_model_default_params
    monkeypatch.setattr(llamacpp, "amx_cpu", lambda: amx)
    monkeypatch.setattr(binding, "Llama", fake_llama)
    assert llamacpp.load_llama(tmp_path / "m.gguf", 128, threads=1) == "model"
    assert seen["extra_buffers"] is (not amx)
    assert seen["arguments"]["n_ctx"] == 128
    assert binding.llama_cpp.llama_model_default_params is default  # restored after the one load
