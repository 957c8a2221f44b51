"""Small things a user meets on the command line: flags and --set read alike, units as documented,
error messages naming the real field, and no noise from libraries on every command."""

import json
import subprocess
import sys

import pytest

from tunesmith.cli import build_parser, main
from tunesmith.cli.common import config_from_args
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.metrics import schema_checker

from .test_plan import LLAMA_7B


@pytest.mark.parametrize("value", ["2024", "1e-3", "true"])
def test_set_and_the_fields_own_flag_read_a_value_alike(value):
    parser = build_parser()
    by_flag = config_from_args(parser.parse_args(["train", "--name", value]))
    by_set = config_from_args(parser.parse_args(["train", "--set", f"name={value}"]))
    assert by_flag.name == by_set.name == value


def test_a_percent_sign_in_a_fields_description_prints_as_written(capsys):
    """argparse %-formats help text: an unescaped '~30% slower' printed the option's whole attribute dict."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = capsys.readouterr().out
    assert "option_strings" not in shown and "%%" not in shown


def test_gpu_memory_is_gib_like_the_device_table(tmp_path, capsys):
    LLAMA_7B.save_pretrained(tmp_path / "llama7b")
    common = ["plan", "--model", str(tmp_path / "llama7b"), "--tokens", "1e6", "--seq-len", "512", "--json"]
    reports = []
    for device in (["--gpu", "RTX 4090 24GB"], ["--gpu-memory", "24"]):
        assert main([*common, *device]) == 0
        reports.append(json.loads(capsys.readouterr().out)["recommendation"])
    named, by_size = reports
    # 24 GB read as 24e9 bytes (22.4 GiB) made full fine-tuning need 6 cards instead of the table's 5.
    assert [r.replace("24 GiB device", "RTX 4090 24GB") for r in by_size["reasons"]] == named["reasons"]
    assert by_size["method"] == named["method"] and by_size["batch_size"] == named["batch_size"]


def test_schema_errors_name_the_field_as_it_is_spelled(tmp_path):
    with pytest.raises(TunesmithError, match=r"eval\.schema_path"):
        schema_checker(None)
    (tmp_path / "s.json").write_text("{not json")
    with pytest.raises(TunesmithError, match=r"eval\.schema_path"):
        schema_checker(str(tmp_path / "s.json"))


def test_importing_bitsandbytes_after_tunesmith_is_quiet():
    """On AVX512-BF16 CPUs bitsandbytes warns about an optional kernel of a path tunesmith never takes."""
    done = subprocess.run(
        [sys.executable, "-c", "import tunesmith.cli, bitsandbytes"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "kernels-community" not in done.stderr


def test_wrapping_a_model_with_peft_prints_no_deprecation_of_theirs():
    code = (
        "import sys; sys.path.insert(0, '.'); import tunesmith\n"
        "from tests.conftest import build_model\n"
        "from tunesmith.config import LoraConfig\n"
        "from tunesmith.methods.lora import apply_lora\n"
        "apply_lora(build_model(300), LoraConfig(r=4, alpha=8))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "is_gradient_checkpointing" not in done.stderr


def test_data_check_prints_labels_that_look_like_markup(tmp_path, capsys):
    rows = [{"text": f"example number {i} about things", "label": ["[/bad]", "[red]x"][i % 2]} for i in range(20)]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "check", str(path), "--label-field", "label"]) in (0, 1)
    assert "[/bad]" in capsys.readouterr().out
