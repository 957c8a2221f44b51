"""The run directory's layout, in one place: every file a run holds is named here and nowhere else.

LAYOUT lists them: docs/run-directory.md shows the same list (tests/test_docs.py checks it), and
tests/test_rundir.py checks LAYOUT against a real run and that no other module spells a run file's name. Code
reaches a run file through a RunDir property, never by its name: `RunDir(path).metrics`,
`RunDir(path).checkpoint(step).state`.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith.errors import TunesmithError
from tunesmith.files import check_replaceable, is_marked, mark, write_text_atomic

if TYPE_CHECKING:
    from tunesmith.config import RunConfig

# Every path a run directory may hold (glob patterns, relative to it), with what it is. A file a run writes that
# matches none of these is a test failure; so is a pattern here that nothing writes.
LAYOUT: dict[str, str] = {
    ".tunesmith.json": "marker: tunesmith made this folder (only such folders are ever replaced)",
    "manifest.json": "status, versions, data and split hashes, precision, pid/host/start time (rewritten atomically)",
    "config.yaml": "the validated config the run started with",
    "data/": "the run's own data",
    "data/train.jsonl": "the train split as the run saw it (val.jsonl and test.jsonl beside it)",
    "data/val.jsonl": "the validation split",
    "data/test.jsonl": "the test split: what compare scores",
    "data/check.json": "the data gate's report",
    "data/tokenize.json": "tokens, truncated and dropped examples",
    "data/reference_logps.json": "preference runs: the starting model's log-probs of every pair, reused on resume",
    "model/": "the trained weights of a full fine-tune (model/*: a Hugging Face model folder)",
    "model/*": "",
    "adapter/": "the trained weights of every other method (adapter/*: a PEFT adapter or the bottleneck adapters)",
    "adapter/*": "",
    "reward_head.safetensors": "reward_model runs: the trained scalar head (hidden -> 1) beside the method's weights",
    "tokenizer/": "the tokenizer the run trained with",
    "tokenizer/*": "",
    "chat_template.jinja": "the chat template training rendered with; export and serve use the same",
    "checkpoints/": "complete checkpoints, one folder per step (a folder counts once renamed into place)",
    "checkpoints/step-*/": "a checkpoint: the files below",
    "checkpoints/step-*/state.json": "step, epoch, data position, best metric (written last: marks it complete)",
    "checkpoints/step-*/trainable.safetensors": "the trainable weights",
    "checkpoints/step-*/optimizer.pt": "the optimizer's state",
    "checkpoints/step-*/scheduler.pt": "the learning-rate schedule's state",
    "checkpoints/step-*/rng.pt": "every random generator's state, for an exact resume",
    "metrics.jsonl": "one record per logged step, validation and event",
    "train_summary.json": "what training did: steps, losses, tokens/s, best checkpoint",
    "plan.json": "the plan's estimate of time, memory and cost for this run, made before it trained",
    "loss.png": "the loss curves (train raw and smoothed, validation)",
    "trackers.json": "ids of the TensorBoard/MLflow/W&B runs, so a resume continues them",
    "tensorboard/": "TensorBoard event files (tracking.trackers: [tensorboard])",
    "tensorboard/*": "",
    "mlflow.db": "the MLflow store, unless tracking.mlflow_uri names another",
    "wandb/": "Weights & Biases' own files (tracking.trackers: [wandb]; the run folder is W&B's dir)",
    "wandb/*": "",
    "eval/": "what compare and the report wrote",
    "eval/compare.json": "the comparison: every contestant's metrics with CIs, p-values, the verdict",
    "eval/predictions.jsonl": "every compared item's prompt, reference and each contestant's answer",
    "eval/report.json": "the run report's data",
    "eval/report.html": "the run report, self-contained",
    "eval/parity-*.json": "tunesmith compare --engine llamacpp: the GGUF export scored beside the tuned model",
    "eval/eval-*.json": "tunesmith eval: a model's metrics, loss, perplexity (eval-SPLIT-LABEL.json; LABEL base/tuned)",
    "eval/predictions-*.jsonl": "tunesmith eval: that model's answers and scores (predictions-SPLIT-LABEL.jsonl)",
    "export/": "exports, one folder per format",
    "export/*/": "an export (merged, adapter, gguf, ollama)",
    "export/*/*": "",
    "serve/": "what serving wrote",
    "serve/requests.sqlite": "the request log: prompts, answers, latency, feedback (monitor reads it)",
}
SPLITS = ("train", "val", "test")  # the run's own splits, data/NAME.jsonl
STEP_DIR = re.compile(r"^step-(\d{6,})$")  # a complete checkpoint's folder name
PARTIAL_PREFIX = ".tmp-"  # a checkpoint being written: a folder of this name is never a checkpoint


@dataclass(frozen=True)
class CheckpointDir:
    """One checkpoint folder's files (checkpoints/step-NNNNNN/)."""

    path: Path

    @property
    def step(self) -> int:
        return int(STEP_DIR.match(self.path.name).group(1))  # type: ignore[union-attr]

    @property
    def state(self) -> Path:
        return self.path / "state.json"

    @property
    def trainable(self) -> Path:
        return self.path / "trainable.safetensors"

    @property
    def optimizer(self) -> Path:
        return self.path / "optimizer.pt"

    @property
    def scheduler(self) -> Path:
        return self.path / "scheduler.pt"

    @property
    def rng(self) -> Path:
        return self.path / "rng.pt"

    def is_complete(self) -> bool:
        return STEP_DIR.match(self.path.name) is not None and self.state.is_file()


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
        # A grpo run's splits may hold prompts without answers; the data gate checked them when the run began.
        return read_conversations(path, prompt_only=True)[0]

    @property
    def check_report(self) -> Path:
        return self.data / "check.json"

    @property
    def reference(self) -> Path:
        """The starting model's log-probs of every train and val pair (preference objectives dpo, ipo, kto)."""
        return self.data / "reference_logps.json"

    @property
    def reward_head(self) -> Path:
        """objective reward_model: the scalar head on the decoder's last hidden state (safetensors)."""
        return self.path / "reward_head.safetensors"

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

    def checkpoint(self, step: int) -> CheckpointDir:
        return CheckpointDir(self.checkpoints / f"step-{step:06d}")

    def partial_checkpoint(self, step: int, pid: int) -> CheckpointDir:
        """Where a checkpoint is written before it is renamed into place (never read as a checkpoint)."""
        return CheckpointDir(self.checkpoints / f"{PARTIAL_PREFIX}step-{step:06d}-{pid}")

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
    def loss_plot(self) -> Path:
        return self.path / "loss.png"

    @property
    def trackers(self) -> Path:
        return self.path / "trackers.json"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def mlflow_store(self) -> Path:
        return self.path / "mlflow.db"

    @property
    def eval(self) -> Path:
        return self.path / "eval"

    @property
    def compare(self) -> Path:
        return self.eval / "compare.json"

    @property
    def predictions(self) -> Path:
        return self.eval / "predictions.jsonl"

    @property
    def report_json(self) -> Path:
        return self.eval / "report.json"

    @property
    def report_html(self) -> Path:
        return self.eval / "report.html"

    def parity(self, gguf_type: str) -> Path:
        return self.eval / f"parity-{gguf_type}.json"

    def eval_summary(self, split: str, label: str) -> Path:
        return self.eval / f"eval-{split}-{label}.json"

    def eval_predictions(self, split: str, label: str) -> Path:
        return self.eval / f"predictions-{split}-{label}.jsonl"

    @property
    def wandb(self) -> Path:
        return self.path / "wandb"

    def export(self, fmt: str) -> Path:
        return self.path / "export" / fmt

    @property
    def serve_log(self) -> Path:
        return self.path / "serve" / "requests.sqlite"

    def weights(self, config: RunConfig) -> Path:
        """model/ for a full fine-tune (a whole model), adapter/ for every other method (what it trained)."""
        return self.path / ("model" if config.method == "full" else "adapter")

    def trained_weights(self, config: RunConfig, then: str = ".") -> Path:
        """The weights folder, or an error saying training has not finished; `then` ends it with what to do."""
        weights = self.weights(config)
        if not weights.is_dir():
            raise TunesmithError(f"{self.path} has no {weights.name}/: training has not finished{then}")
        return weights

    def create(self, overwrite: bool) -> None:
        """Make the run folder (data/ inside, tunesmith's marker first); an existing one only with overwrite, and
        only if tunesmith made it."""
        if self.path.exists() and any(self.path.iterdir()):
            if not overwrite:
                raise TunesmithError(
                    f"Run directory {self.path} already exists. Choose another --out, pass --resume to continue it "
                    "from its last checkpoint, or --overwrite to replace it."
                )
            check_replaceable(self.path, self.made_by_tunesmith(), "a run directory")
            shutil.rmtree(self.path)
        self.data.mkdir(parents=True, exist_ok=True)
        mark(self.path, "run")  # first, so that a run that dies before its manifest is still known as ours

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
