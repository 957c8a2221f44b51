"""Export: merged, adapter, GGUF and Ollama exports load elsewhere and keep the training chat format."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests import gotemplate
from tests.conftest import build_tokenizer
from tests.serve_helpers import run_with_template
from tests.test_tools import BOOK, CANCEL
from tunesmith.cli import main
from tunesmith.config import RunConfig
from tunesmith.data.formats import Message, chat_messages
from tunesmith.data.tokenize import DEFAULT_CHAT_TEMPLATE, render
from tunesmith.data.tools import TOOLS_PREAMBLE, with_tools_block
from tunesmith.deploy.export import export_run, modelfile, modelfile_string
from tunesmith.deploy.template import SAMPLE_CONVERSATIONS, TurnFormat, go_template, turn_format
from tunesmith.errors import TunesmithError
from tunesmith.rundir import RunDir

GEMMA_STYLE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first if loop.first else '') + message['content'] + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
PROMPT = torch.tensor([[1, 5, 9, 33, 70, 100, 7, 250]])


def _tuned_logits(run):
    from tunesmith.evaluate.generate import load_run

    with torch.no_grad():
        return load_run(run).model(PROMPT).logits


def _logits(model):
    with torch.no_grad():
        return model(PROMPT).logits


def _expected(tokenizer, conversation):
    generation = conversation[-1]["role"] != "assistant"
    return render(tokenizer, tuple(Message(**m) for m in conversation), generation_prompt=generation)


def test_merged_export_answers_like_the_adapter_model(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = export_run(lora_run, "merged", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(target)
    tuned = _tuned_logits(lora_run)
    assert torch.allclose(_logits(merged), tuned, atol=1e-5)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(target)
    assert tokenizer.chat_template == (lora_run / "chat_template.jinja").read_text()
    assert tokenizer.eos_token_id in json.loads((target / "generation_config.json").read_text())["eos_token_id"]


def test_adapter_export_loads_with_peft(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    target = export_run(lora_run, "adapter", tmp_path / "adapter")
    settings = json.loads((target / "adapter_config.json").read_text())
    assert (target / "adapter_model.safetensors").is_file() and settings["peft_type"] == "LORA"
    base = AutoModelForCausalLM.from_pretrained(settings["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(target))
    assert torch.allclose(_logits(model), _tuned_logits(lora_run), atol=1e-5)


# q8_0 rounds each weight to 1 of 255 steps per block of 32: on this 32-wide toy model the logits move by ~5% of
# the largest one (the trained adapter decides how much), on real widths far less.
@pytest.mark.parametrize("kind,tolerance", [("f16", 2e-3), ("q8_0", 8e-2)])
def test_gguf_export_reads_back_with_the_same_weights_tokenizer_and_template(lora_run, tmp_path, kind, tolerance):
    import gguf
    from transformers import AutoModelForCausalLM

    target = export_run(lora_run, "gguf", tmp_path / "gguf", gguf_type=kind)
    path = next(target.glob("*.gguf"))
    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    tokenizer = build_tokenizer()
    assert fields["tokenizer.ggml.tokens"] == [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda x: x[1])]
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.pre"] == "gpt-2"  # the test tokenizer splits with GPT-2's ByteLevel regex
    assert fields["tokenizer.chat_template"] == (lora_run / "chat_template.jinja").read_text()
    types = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    assert types == {kind.upper()}
    # transformers' own GGUF reader undoes llama.cpp's layout: the logits must match the tuned model's.
    loaded = AutoModelForCausalLM.from_pretrained(target, gguf_file=path.name)
    tuned = _tuned_logits(lora_run)
    assert (_logits(loaded) - tuned).abs().max() <= tolerance * tuned.abs().max()


def test_gguf_chat_template_renders_like_training(lora_run, tmp_path):
    import gguf

    path = next(export_run(lora_run, "gguf", tmp_path / "g").glob("*.gguf"))
    template = gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents()
    exported = build_tokenizer(chat_template=template)
    trained = build_tokenizer(chat_template=(lora_run / "chat_template.jinja").read_text())
    for conversation in SAMPLE_CONVERSATIONS:
        generation = conversation[-1]["role"] != "assistant"
        assert exported.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation) == (
            _expected(trained, conversation)
        )


def test_ollama_export_writes_a_modelfile_whose_template_renders_like_training(lora_run, tmp_path):
    target = export_run(lora_run, "ollama", tmp_path / "ollama")
    modelfile = (target / "Modelfile").read_text()
    gguf_name = next(target.glob("*.gguf")).name
    assert f"FROM ./{gguf_name}" in modelfile and 'PARAMETER stop "</s>"' in modelfile
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    trained = build_tokenizer(chat_template=(lora_run / "chat_template.jinja").read_text())
    for conversation in SAMPLE_CONVERSATIONS:
        assert gotemplate.render(template, conversation) == _expected(trained, conversation)


def _read_modelfile(text: str) -> dict[str, str]:
    """Each command's value as Ollama's parser reads a Modelfile (ollama parser/parser.go, ParseFile): no escapes,
    unprintable characters dropped, and a value ends at the first line break where the text so far, stripped, is
    whole: unquoted, "..." or triple-quoted. PARAMETER values are keyed by the parameter's name."""
    found, state, buffer, name = {}, "nil", "", ""

    def unquote(value: str) -> str | None:
        if value.startswith('"""'):
            return value[3:-3] if len(value) >= 6 and value.endswith('"""') else None
        if value.startswith('"'):
            return value[1:-1] if len(value) >= 2 and value.endswith('"') else None
        return value

    for char in text:
        if state == "nil":
            state, buffer = ("comment", "") if char == "#" else ("nil", "") if char in " \t\r\n" else ("name", char)
        elif state == "comment":
            state = "nil" if char in "\r\n" else "comment"
        elif state in ("name", "parameter"):
            if char in " \t":
                name = buffer.lower() if state == "name" else buffer
                state, buffer = ("parameter" if name == "parameter" else "value"), ""
            else:
                assert char.isalnum() or char == "_", f"bad command character {char!r}"
                buffer += char
        elif char in " \t\r\n":
            value = unquote(buffer.strip(" \t\r\n"))
            if value is None or char in " \t":
                buffer += char
            else:
                assert name not in found or name == "stop", f"{name} twice"
                found[name], state, buffer = value, "nil", ""
        elif char.isprintable():
            buffer += char
    assert state in ("nil", "comment"), f"Modelfile ends inside {name}: {buffer!r}"
    return found


def test_modelfile_template_and_stop_read_back_exactly_as_ollama_reads_them():
    # Quotes right before line ends ended Ollama's triple-quoted TEMPLATE early; a lone quote broke PARAMETER stop.
    user, answer = 'User said """\n', 'Bot \\ "quoted":\n'
    turns = TurnFormat(
        first={"system": '"""System"""\n', "user": user, "assistant": answer},
        prefix={"system": '"""System"""\n', "user": user, "assistant": answer},
        suffix={"system": '"\n\n', "user": '"\n', "assistant": '<end "turn">\\\n'},
        generation=answer,
        system_merged=False,
    )
    template = go_template(turns)
    read = _read_modelfile(modelfile("m.gguf", turns, template, RunConfig()))
    assert read["template"] == template and read["stop"] == '<end "turn">\\' == turns.stop
    for conversation in [*SAMPLE_CONVERSATIONS, [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]]:
        assert gotemplate.render(template, conversation) == turns.render(conversation)
    for stop in ['"', '""', '"a', 'a"', 'a\\"b\\', ' x """ y ']:
        assert _read_modelfile(f"FROM ./m.gguf\nPARAMETER stop {modelfile_string(stop, 'stop')}\n")["stop"] == stop
    for unwritable in ['x"""\ny', "bell \x07"]:  # no quoting keeps these whole: refused, not written broken
        with pytest.raises(TunesmithError, match="cannot be written so that Ollama reads it back"):
            modelfile_string(unwritable, "TEMPLATE")


@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, GEMMA_STYLE], ids=["default", "gemma-style"])
def test_go_template_matches_jinja_with_and_without_system_and_bos(template):
    tokenizer = build_tokenizer(chat_template=template)
    turns = turn_format(tokenizer)
    assert turns.system_merged == (template == GEMMA_STYLE)
    conversations = [*SAMPLE_CONVERSATIONS, [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]]
    for conversation in conversations:
        expected = _expected(tokenizer, conversation)
        assert gotemplate.render(go_template(turns), conversation) == expected
        # With the runtime adding BOS itself, the template leaves it out.
        assert gotemplate.render(go_template(turns, strip_bos="<s>"), conversation) == expected.removeprefix("<s>")
    assert turns.stop == ("<end_of_turn>" if template == GEMMA_STYLE else "</s>")


BOOK_CALL = {
    "id": "c1",
    "type": "function",
    "function": {"name": "book", "arguments": {"patient": "P-17", "day": "monday"}},
}
CANCEL_CALL = {"id": "c2", "type": "function", "function": {"name": "cancel", "arguments": {"id": "A-3"}}}
TOOL_CONVERSATIONS = (
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Book P-17 on Monday."},
        {"role": "assistant", "content": None, "tool_calls": [BOOK_CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": "booked at 9:00"},
        {"role": "assistant", "content": "Booked for Monday 9:00."},
        {"role": "user", "content": "Thanks."},
    ],
    [
        {"role": "user", "content": "Book P-17, cancel A-3."},
        {"role": "assistant", "content": "Both now.", "tool_calls": [BOOK_CALL, CANCEL_CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": "booked"},
        {"role": "tool", "tool_call_id": "c2", "content": "cancelled"},
    ],
    [{"role": "user", "content": "Hello there."}],
)


def _as_ollama_writes_json(text: str, tools: list[dict], conversation: list[dict]) -> str:
    """Training's rendering with each schema's and each call's arguments' JSON as Ollama writes it (compact)."""
    for tool in tools:
        text = text.replace(json.dumps(tool["function"]), str(gotemplate.GoJSON(tool["function"])))
    for message in conversation:
        for call in message.get("tool_calls") or []:
            arguments = call["function"]["arguments"]
            text = text.replace(json.dumps(arguments), str(gotemplate.GoJSON(arguments)))
    return text


@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, GEMMA_STYLE], ids=["default", "gemma-style"])
def test_the_ollama_template_renders_tools_calls_and_results_like_training(template):
    tokenizer = build_tokenizer(chat_template=with_tools_block(template))
    ollama = go_template(turn_format(tokenizer), tools=True)
    for conversation in TOOL_CONVERSATIONS:
        messages = tuple(chat_messages(conversation))
        generation = conversation[-1]["role"] != "assistant"
        trained = render(tokenizer, messages, generation_prompt=generation, tools=(BOOK, CANCEL))
        expected = _as_ollama_writes_json(trained, [BOOK, CANCEL], conversation)
        assert "<tools>" in expected and gotemplate.render(ollama, conversation, [BOOK, CANCEL]) == expected
        without_tools = render(tokenizer, messages, generation_prompt=generation)
        assert gotemplate.render(ollama, conversation) == _as_ollama_writes_json(without_tools, [], conversation)
    read = _read_modelfile(modelfile("m.gguf", turn_format(tokenizer), ollama, RunConfig()))
    assert read["template"] == ollama  # Ollama's Modelfile parser reads the tools block back whole


def test_exports_of_a_run_trained_with_tools_carry_its_tools_block(lora_run, tmp_path):
    import gguf

    run = run_with_template(lora_run, tmp_path, "clinic", with_tools_block)
    target = export_run(run, "ollama", tmp_path / "ollama")
    template = _read_modelfile((target / "Modelfile").read_text())["template"]
    assert "{{ range $j, $t := $.Tools }}" in template and "{{ range $j, $c := $m.ToolCalls }}" in template
    path = next(target.glob("*.gguf"))
    carried = gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents()  # what llama.cpp --jinja renders
    assert carried == RunDir(run).chat_template.read_text() and carried.startswith(TOOLS_PREAMBLE)


def test_templates_that_cannot_be_split_per_role_are_refused():
    tokenizer = build_tokenizer(chat_template="{% for m in messages %}{{ m['content'] | lower }}{% endfor %}")
    with pytest.raises(TunesmithError, match="cannot be taken apart per role"):
        turn_format(tokenizer)


def test_an_embedded_model_run_exports_from_the_cached_checkpoint_without_the_package(
    lora_run, tiny_model_dir, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM

    from tunesmith import models

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, models.EMBEDDED["gemma-3-270m"].package, None)  # not installed
    shutil.copytree(tiny_model_dir, tmp_path / "cache" / "models" / "gemma-3-270m-q4_k_m-0123456789abcdef")
    run = shutil.copytree(lora_run, tmp_path / "runs" / "embedded")
    config = run / "config.yaml"
    config.write_text(config.read_text().replace(f"model: {tiny_model_dir}\n", "model: gemma-3-270m\n"))
    assert "model: gemma-3-270m\n" in config.read_text()
    merged = export_run(run, "merged", tmp_path / "merged")
    assert torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(merged)), _tuned_logits(lora_run), atol=1e-5)
    with pytest.raises(TunesmithError, match="--format gguf and ollama copy the tokenizer"):
        export_run(run, "ollama", tmp_path / "ollama")


def test_export_never_overwrites_without_the_flag(lora_run, tmp_path):
    target = export_run(lora_run, "adapter", tmp_path / "a")
    marker = target / "keep.txt"
    marker.write_text("mine")
    with pytest.raises(TunesmithError, match="--overwrite"):
        export_run(lora_run, "adapter", target)
    assert marker.read_text() == "mine"
    export_run(lora_run, "adapter", target, overwrite=True)
    assert not marker.exists() and (target / "adapter_config.json").is_file()


def test_export_cli_and_bad_input(lora_run, tmp_path, capsys):
    assert main(["export", str(lora_run), "--format", "merged", "--out", str(tmp_path / "m"), "--quiet"]) == 0
    assert "Exported merged" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "nope"), "--format", "merged"]) == 2
    assert "not a tunesmith run" in capsys.readouterr().err


def test_llama_cpp_generates_from_the_gguf_export(lora_run, tmp_path):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)"
    )
    path = next(export_run(lora_run, "gguf", tmp_path / "g", gguf_type="f16").glob("*.gguf"))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False)
    tokens = llm.tokenize(b"colour red item 3", add_bos=False, special=True)
    assert tokens == build_tokenizer()("colour red item 3", add_special_tokens=False)["input_ids"]
    result = llm.create_completion("colour red", max_tokens=4, temperature=0.0)
    assert result["usage"]["completion_tokens"] >= 1


def test_export_parity_scores_the_gguf_beside_the_tuned_model(lora_run, capsys):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    from tunesmith.evaluate.parity import _summary, parity_run

    summary = parity_run(lora_run, "f32", limit=6)
    config = RunDir(lora_run).read_config()
    assert summary.items == 6 and 0 <= summary.identical <= 6
    assert set(summary.metrics) >= set(config.eval.metrics)
    assert summary.gguf.endswith("-f32.gguf") and "export/gguf-f32" in summary.gguf
    assert json.loads(RunDir(lora_run).parity("f32").read_text())["identical"] == summary.identical
    assert summary.verdict.startswith("The export") or summary.verdict.startswith("No significant")
    # The CLI reuses the export now in place, and says how many answers are identical.
    assert main(["compare", str(lora_run), "--engine", "llamacpp", "--gguf-type", "f32", "--limit", "6"]) == 0
    assert f"Identical greedy answers: {summary.identical} of 6" in capsys.readouterr().out
    # An export that has lost what was learnt is called worse, with the numbers.
    references = [f"colour {i}" for i in range(30)]
    worse = _summary(lora_run, "test", Path("x.gguf"), "f32", config.eval, references, references, ["?"] * 30)
    assert worse.identical == 0 and worse.verdict.startswith("The export is WORSE"), worse.verdict
    same = _summary(lora_run, "test", Path("x.gguf"), "f32", config.eval, references, references, references)
    assert same.verdict.startswith("The export (x.gguf) answers exactly as the tuned model on all 30 items")
