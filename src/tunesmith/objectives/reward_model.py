"""`objective: reward_model`: a Bradley-Terry scorer trained on preference pairs, and the loader that scores with it.

The score of a prompt and answer is a linear head (hidden -> 1) on the decoder's last hidden state at the last real
token, never the LM head. The head is a submodule of the model the method built (`attach_head`), so it trains,
checkpoints and resumes with the method's weights; a finished run keeps it in reward_head.safetensors beside them.
`load_reward_model` reads a run back from safetensors, JSON and YAML only: it never runs code from the run folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tunesmith.config import PreferenceConfig
from tunesmith.data.formats import Conversation, Message
from tunesmith.data.tokenize import TokenizedExample, tokenize_conversation, use_chat_template
from tunesmith.errors import TunesmithError
from tunesmith.evaluate.generate import LoadedRun, load_run
from tunesmith.files import replace_file
from tunesmith.objectives.losses import reward_stats
from tunesmith.objectives.preference import Preference, PreferenceExample
from tunesmith.rundir import RunDir
from tunesmith.train.batching import collate
from tunesmith.train.loss import _decoder_hidden

HEAD = "reward_head"  # the head's submodule name on the model while it trains
# TRL's center_rewards_coefficient (Eisenstein et al. 2023): the Bradley-Terry loss sees only differences of
# scores, so without a small pull toward 0 their level drifts freely and is meaningless across runs.
CENTERING = 1e-3
STATS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, centering: float = CENTERING) -> torch.Tensor:
    """Per pair: -log sigmoid(r_chosen - r_rejected) + centering * (r_chosen + r_rejected)^2."""
    return -F.logsigmoid(chosen - rejected) + centering * (chosen + rejected) ** 2


def new_head(hidden_size: int, seed: int, std: float = 0.02) -> torch.nn.Linear:
    """A fresh fp32 head, drawn from its own generator seeded by train.seed: compare rebuilds the exact head a run
    started with (its untrained start) whatever else drew random numbers before it."""
    head = torch.nn.Linear(hidden_size, 1)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * std)
        head.bias.zero_()
    return head


def fresh_head(model_config: Any, seed: int) -> torch.nn.Linear:
    """The head a run of this model and train.seed starts with (std: the model's own initializer_range)."""
    return new_head(model_config.hidden_size, seed, float(getattr(model_config, "initializer_range", 0.02) or 0.02))


def sequence_scores(model: Any, head: torch.nn.Linear, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One fp32 score per row: `head` on the decoder's hidden state at the row's last attended token."""
    hidden = _decoder_hidden(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    mask = batch["attention_mask"]
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask * positions).argmax(dim=1)  # right or left padded alike
    final = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return head(final.to(head.weight.dtype)).squeeze(-1).float()


@dataclass(frozen=True)
class RewardModelObjective(Preference):
    """Pairs batched as the preference objectives batch them (chosen rows, then rejected); the loss Bradley-Terry's."""

    name: str = "reward_model"
    holds: str = "pair"

    def attach(self, model: Any, seed: int) -> Any:
        model.add_module(HEAD, fresh_head(model.config, seed))
        return model

    def loss_sum(
        self, model: Any, batch: dict[str, torch.Tensor], preference: PreferenceConfig | None
    ) -> tuple[torch.Tensor, dict]:
        """Summed Bradley-Terry loss of the batch's pairs; accuracy, margin and mean scores summed over the pairs."""
        scores = sequence_scores(model, getattr(model, HEAD), batch)
        half = scores.shape[0] // 2
        chosen, rejected = scores[:half], scores[half:]
        means = reward_stats(chosen, rejected)
        summed = [means[name] * half for name in ("accuracy", "margin", "chosen", "rejected")]
        return bradley_terry(chosen, rejected).sum(), dict(zip(STATS, summed, strict=True))

    def save_own(self, model: Any, run_dir: Path, trained: dict[str, Any] | None) -> dict[str, Any] | None:
        """Write the head to reward_head.safetensors and take it off the model (and out of `trained`), so the
        method saves exactly what it saves for any other objective."""
        head: torch.nn.Linear = getattr(model, HEAD)
        tensors = {"weight": head.weight.detach().float().cpu(), "bias": head.bias.detach().float().cpu()}
        if trained is not None:
            tensors = {"weight": trained[f"{HEAD}.weight"].float(), "bias": trained[f"{HEAD}.bias"].float()}
            trained = {k: v for k, v in trained.items() if not k.startswith(f"{HEAD}.")}
        delattr(model, HEAD)
        metadata = {"objective": self.name, "hidden_size": str(head.in_features), "centering": str(CENTERING)}
        tensors = {name: t.contiguous() for name, t in tensors.items()}
        replace_file(RunDir(run_dir).reward_head, lambda path: save_file(tensors, str(path), metadata=metadata))
        return trained


REWARD_MODEL = RewardModelObjective()


def read_head(path: Path) -> torch.nn.Linear:
    """The head saved at `path` (safetensors only: nothing in it can run), or an error naming the file."""
    try:
        with safe_open(str(path), framework="pt") as saved:
            metadata = saved.metadata() or {}
            weight, bias = saved.get_tensor("weight"), saved.get_tensor("bias")
    except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as exc:
        raise TunesmithError(
            f"{path}: not a reward head tunesmith wrote ({str(exc).splitlines()[0][:200]}). Train the run again."
        ) from None
    if metadata.get("objective") != "reward_model" or weight.ndim != 2 or weight.shape[0] != 1:
        raise TunesmithError(f"{path}: not a reward head tunesmith wrote (objective, shape). Train the run again.")
    head = torch.nn.Linear(weight.shape[1], 1)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head.eval()


Prompt = Sequence[dict[str, str]] | str


def _messages(prompt: Prompt) -> tuple[Message, ...]:
    if isinstance(prompt, str):
        return (Message("user", prompt),)
    return tuple(Message(str(m["role"]), str(m["content"])) for m in prompt)


@dataclass
class RewardModel:
    """A scorer: `head` on the last hidden state of the run's model (`run`: a loaded run, tokenizer and config)."""

    run: LoadedRun
    head: torch.nn.Linear
    batch_size: int = 8

    def encode(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[TokenizedExample]:
        """Each prompt with its completion as the last assistant turn, rendered and truncated as training did."""
        if len(prompts) != len(completions):
            raise TunesmithError(f"score: {len(prompts)} prompts but {len(completions)} completions.")
        examples, cut = [], self.run.config.data.max_length
        for line, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            conversation = Conversation((*_messages(prompt), Message("assistant", completion)), line=line)
            example = tokenize_conversation(self.run.tokenizer, conversation, "last")
            examples.append(TokenizedExample(example.input_ids[:cut], example.loss_mask[:cut], line))
        return examples

    @torch.no_grad()
    def score_examples(self, examples: list[TokenizedExample]) -> list[float]:
        """One score per tokenized sequence, `batch_size` at a time."""
        model = self.run.model
        device = next(model.parameters()).device
        self.head.to(device)
        scores: list[float] = []
        for start in range(0, len(examples), self.batch_size):
            batch = collate(examples[start : start + self.batch_size], self.run.tokenizer.pad_token_id)
            scores += sequence_scores(model, self.head, {k: v.to(device) for k, v in batch.items()}).tolist()
        return scores

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        """One score per (prompt, completion): a prompt is a list of {role, content} messages or a user message."""
        return self.score_examples(self.encode(prompts, completions))

    def pair_scores(self, pairs: list[PreferenceExample]) -> list[tuple[float, float]]:
        """(chosen, rejected) scores of each tokenized pair."""
        chosen = self.score_examples([p.first for p in pairs])
        return list(zip(chosen, self.score_examples([p.second for p in pairs]), strict=True))


def load_reward_model(run_dir: str | Path, batch_size: int | None = None) -> RewardModel:
    """The scorer a finished `objective: reward_model` run trained, in eval mode: its method's weights on the base,
    its head, its tokenizer and chat template. Only safetensors, JSON and YAML are read from the folder."""
    layout = RunDir(Path(run_dir))
    config = layout.read_config()
    if config.objective != "reward_model":
        raise TunesmithError(
            f"{layout.path} trained objective {config.objective}, not a reward model: train one with "
            "objective: reward_model on chosen/rejected pairs."
        )
    if not layout.reward_head.is_file():
        raise TunesmithError(f"{layout.path} has no {layout.reward_head.name}: training has not finished.")
    loaded = load_run(layout.path)
    if layout.chat_template.is_file():
        use_chat_template(loaded.tokenizer, layout.chat_template.read_text(encoding="utf-8"))
    head = read_head(layout.reward_head)
    if head.in_features != loaded.model.config.hidden_size:
        raise TunesmithError(f"{layout.reward_head}: its width does not fit {config.model}. Train the run again.")
    return RewardModel(loaded, head, batch_size or config.eval.batch_size)
