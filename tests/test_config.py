import pytest

from tunesmith.cli import build_parser
from tunesmith.cli.common import config_from_args
from tunesmith.config import dump_config, load_config
from tunesmith.errors import TunesmithError


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_and_run_dir():
    config = load_config()
    assert config.model == "gemma-3-270m" and config.method == "lora"
    assert config.name == "run" and str(config.run_dir) == "runs/run"
    assert load_config(overrides=["out=runs/x"]).name == "x"


def test_unknown_keys_are_named_with_the_closest_valid_key(tmp_path):
    path = write(tmp_path, "modle: x\ntrain:\n  learning_rate: 1e-4\n  max_step: 3\nlora:\n  rank: 8\n")
    with pytest.raises(TunesmithError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message and "4 problem(s)" in message
    assert "modle: unknown key; did you mean 'model'?" in message
    assert "train.max_step: unknown key; did you mean 'max_steps'?" in message
    assert "lora.rank: unknown key; valid keys here: r, alpha, dropout, target_modules" in message
    assert "train.learning_rate: unknown key" in message


def test_bad_values_name_the_field(tmp_path):
    with pytest.raises(
        TunesmithError, match=r"method: Input should be 'lora', 'qlora', 'dora', 'adapter' or 'full'.*'qlora2'"
    ):
        load_config(write(tmp_path, "method: qlora2\n"))
    with pytest.raises(TunesmithError, match=r"train.lr: Input should be greater than 0"):
        load_config(overrides=["train.lr=-1"])


def test_set_overrides_a_config_field(tmp_path):
    path = write(tmp_path, "data:\n  path: d.jsonl\ntrain:\n  lr: 0.1\n  max_steps: 5\n")
    config = load_config(path, ["train.lr=1e-4", "lora.target_modules=q_proj,v_proj"])
    assert config.train.lr == 1e-4 and config.train.max_steps == 5 and config.data.path == "d.jsonl"
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(TunesmithError, match="expected KEY=VALUE"):
        load_config(path, ["train.lr"])


def test_yaml_errors_name_the_line(tmp_path):
    with pytest.raises(TunesmithError, match=r"run.yaml line 2: not valid YAML"):
        load_config(write(tmp_path, "model: x\n  bad: [\n"))
    with pytest.raises(TunesmithError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_every_field_is_a_flag_and_flags_beat_the_file(tmp_path):
    path = write(tmp_path, "model: from-file\ntrain:\n  lr: 0.5\n")
    parser = build_parser()
    args = parser.parse_args(
        [
            "train",
            str(path),
            "--model",
            "m",
            "--data",
            "d.jsonl",
            "--method",
            "full",
            "--max-steps",
            "50",
            "--out",
            "runs/x",
            "--train.batch_size",
            "2",
            "--chat-template",
            "{{ messages }}",
            "--set",
            "train.seed=3",
        ]
    )
    config = config_from_args(args)
    assert (config.model, config.data.path, config.method, config.train.max_steps) == ("m", "d.jsonl", "full", 50)
    assert config.train.batch_size == 2 and config.train.lr == 0.5 and config.train.seed == 3
    assert config.chat_template == "{{ messages }}" and config.name == "x"


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in [
        "Peak learning rate of AdamW",
        "--max-steps",
        "--data PATH",
        "One of: lora, qlora, dora, adapter, full",
        "--eval.batch_size",
        "LoRA rank",
    ]:
        assert phrase in text


def test_resolved_config_round_trips(tmp_path):
    config = load_config(overrides=["data.path=x.jsonl", "train.max_steps=4"])
    path = write(tmp_path, dump_config(config))
    assert load_config(path) == config
