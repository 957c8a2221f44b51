"""The run directory's layout, in one place: every file a run holds is named here and nowhere else.

runs/NAME/
  manifest.json        status, data hashes, precision, pid/host (rewritten atomically; `watch` reads it)
  config.yaml          the validated config the run started with
  data/                train/val/test splits as the run saw them, check.json (data gate), tokenize.json (tokens),
                       reference_logps.json (preference runs: the starting model's log-probs, reused on resume)
  model/ or adapter/   the trained weights (full fine-tuning: model/, every other method: adapter/)
  tokenizer/, chat_template.jinja
  checkpoints/         step-NNNNNN/ directories while training
  metrics.jsonl, train_summary.json, plan.json
  eval/, export/FORMAT/, serve/requests.sqlite
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith.errors import TunesmithError
from tunesmith.files import is_marked, write_text_atomic

if TYPE_CHECKING:
    from tunesmith.config import RunConfig


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def manifest(self) -> Path:
        return self.path / "manifest.json"

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def data(self) -> Path:
        return self.path / "data"

    def split(self, name: str) -> Path:
        """One of the run's own train/val/test splits."""
        return self.data / f"{name}.jsonl"

    def read_split(self, name: str) -> list[Any]:
        """The conversations of a saved split, in the format it was written in (chat, text, pairs or KTO rows)."""
        from tunesmith.data.formats import read_conversations

        path = self.split(name)
        if path.is_file() and not path.read_text(encoding="utf-8").strip():
            return []  # a split turned off (val_fraction 0) is written empty
        return read_conversations(path)[0]

    @property
    def check_report(self) -> Path:
        return self.data / "check.json"

    @property
    def reference(self) -> Path:
        """The starting model's log-probs of every train and val pair (preference objectives dpo, ipo, kto)."""
        return self.data / "reference_logps.json"

    @property
    def tokenize_report(self) -> Path:
        return self.data / "tokenize.json"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer"

    @property
    def chat_template(self) -> Path:
        return self.path / "chat_template.jinja"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "train_summary.json"

    @property
    def plan(self) -> Path:
        return self.path / "plan.json"

    @property
    def eval(self) -> Path:
        return self.path / "eval"

    def export(self, fmt: str) -> Path:
        return self.path / "export" / fmt

    @property
    def serve_log(self) -> Path:
        return self.path / "serve" / "requests.sqlite"

    def weights(self, config: RunConfig) -> Path:
        from tunesmith.methods import weights_dir  # imports torch; reading a run's files must not

        return weights_dir(config, self.path)

    def trained_weights(self, config: RunConfig, then: str = ".") -> Path:
        """The weights folder, or an error saying training has not finished; `then` ends it with what to do."""
        weights = self.weights(config)
        if not weights.is_dir():
            raise TunesmithError(f"{self.path} has no {weights.name}/: training has not finished{then}")
        return weights

    def is_run(self) -> bool:
        """A run has started here (its manifest exists), whatever became of it."""
        return self.manifest.is_file()

    def made_by_tunesmith(self) -> bool:
        """A folder tunesmith made as a run: our marker, or (runs from before the marker) our manifest."""
        if is_marked(self.path):
            return True
        try:
            return "tunesmith" in self.read_manifest()
        except (OSError, ValueError, TypeError):
            return False

    def read_config(self) -> RunConfig:
        from tunesmith.config import build_config, read_config_file

        if not self.config.is_file():
            raise TunesmithError(f"{self.path} is not a tunesmith run (no config.yaml). Pass a directory under runs/.")
        return build_config(read_config_file(self.config), source=str(self.config))

    def read_config_fields(self) -> dict[str, Any]:
        """The saved config as plain YAML, {} when absent: listings and reports show what is there."""
        import yaml

        return yaml.safe_load(self.config.read_text()) if self.config.is_file() else {}

    def write_config(self, text: str) -> None:
        write_text_atomic(self.config, text)

    def read_manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest.read_text(encoding="utf-8"))

    def write_manifest(self, info: dict[str, Any], status: str, **extra: Any) -> None:
        record = info | {"status": status, **extra}
        write_text_atomic(self.manifest, json.dumps(record, indent=2))  # `watch` reads it meanwhile
