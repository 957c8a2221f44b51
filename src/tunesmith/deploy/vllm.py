"""`tunesmith serve --engine vllm`: the same runs served by vLLM, for GPU throughput at scale.

vLLM serves the base model with the runs' PEFT adapters as LoRA modules (or a full fine-tune's
model folder) under the same model names and chat template as `tunesmith serve`, so clients do not
change. tunesmith only builds the command and its environment; vLLM runs it. The API key travels in
the environment (VLLM_API_KEY), never on the command line, which any local user can read in `ps`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from tunesmith.deploy.engine import BASE
from tunesmith.errors import TunesmithError
from tunesmith.rundir import RunDir

# tunesmith's parser of a template's calls (data/tools.PARSERS) -> vLLM's --tool-call-parser for the same form.
VLLM_TOOL_PARSERS = {"hermes": "hermes", "mistral": "mistral", "json": "llama3_json"}
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM allocates LoRA slots for


def vllm_command(
    run_dirs: list[Path], host: str, port: int, max_tokens_limit: int, cors_origins: Iterable[str] = ()
) -> list[str]:
    """The `vllm serve` command line; cors_origins: the web pages allowed to call it (vLLM's default is any)."""
    from tunesmith.methods import method_of
    from tunesmith.models import resolve_model_path

    configs = [RunDir(path).read_config() for path in run_dirs]
    weights = [RunDir(path).trained_weights(config) for path, config in zip(run_dirs, configs, strict=True)]
    for path, config in zip(run_dirs, configs, strict=True):
        if not method_of(config).exports:  # no standard-runtime format at all
            raise TunesmithError(f"{path}: bottleneck adapters are not a vLLM format; serve it with --engine native.")
    first = run_dirs[0]
    command = ["vllm", "serve"]
    if all(method_of(config).uses_peft for config in configs):
        if len({config.model for config in configs}) > 1:
            raise TunesmithError("vLLM serves adapters over one base model; these runs use different bases.")
        rank = max(config.lora.r for config in configs)
        slot = next((r for r in LORA_RANKS if r >= rank), rank)
        command += [resolve_model_path(configs[0].model), "--served-model-name", BASE, "--enable-lora"]
        command += [
            "--lora-modules",
            *[f"{path.name}={folder}" for path, folder in zip(run_dirs, weights, strict=True)],
        ]
        command += ["--max-lora-rank", str(slot), "--max-loras", str(len(run_dirs))]
    elif len(run_dirs) == 1:
        command += [str(weights[0]), "--served-model-name", first.name]
    else:
        raise TunesmithError("vLLM serves several runs together only as LoRA adapters over one base model.")
    command += ["--chat-template", str(RunDir(first).chat_template), *tool_flags(first)]
    command += ["--host", host, "--port", str(port)]
    command += ["--override-generation-config", f'{{"max_new_tokens": {max_tokens_limit}}}']
    command += ["--allowed-origins", json.dumps(list(cors_origins))]
    return command


def tool_flags(run_dir: Path) -> list[str]:
    """vLLM's tool-call options for the run's template: its parser (the one tunesmith's parser of that template
    corresponds to) and auto tool choice; none for a template that renders no tools."""
    from tunesmith.data.tokenize import tool_parser
    from tunesmith.deploy.export import run_tokenizer

    parser = tool_parser(run_tokenizer(run_dir))
    if parser is None:
        return []
    return ["--enable-auto-tool-choice", "--tool-call-parser", VLLM_TOOL_PARSERS[parser]]


def vllm_env(api_key: str | None) -> dict[str, str]:
    """This process's environment for vLLM, with the API key vLLM reads when --api-key is not given."""
    return dict(os.environ) | ({"VLLM_API_KEY": api_key} if api_key else {})


def vllm_available() -> bool:
    return shutil.which("vllm") is not None and importlib.util.find_spec("vllm") is not None
