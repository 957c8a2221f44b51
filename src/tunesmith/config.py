"""The typed run config: one YAML file (or command-line flags) describes a whole run.

Every field carries one description; the same text is the YAML documentation and the `--help` of
its command-line flag. Unknown keys are refused with the closest valid key. After validation the
typed object is passed along; nothing writes runtime state back into it.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tunesmith.errors import TunesmithError

DEFAULT_MODEL = "gemma-3-270m"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    path: str | None = Field(None, description="Training data file: JSONL, JSON, CSV or Parquet.")
    format: Literal["auto", "chat", "sharegpt", "alpaca", "prompt_completion", "text", "preference", "kto"] = Field(
        "auto", description="Record format; 'auto' detects it from the fields of the first record."
    )
    test_path: str | None = Field(
        None, description="Held-out test file; without it, test_fraction of the data is split off."
    )
    test_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of the data held out for testing when test_path is unset."
    )
    val_path: str | None = Field(
        None, description="Validation file scored during training; without it, val_fraction of the data is split off."
    )
    val_fraction: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="Share of the data held out for validation during training (val loss, best checkpoint, "
        "early stopping) when val_path is unset; 0 turns validation off.",
    )
    max_length: int = Field(1024, gt=8, description="Longest tokenized example; longer ones are truncated and counted.")
    allow_warnings: bool = Field(
        False, description="Train even when the data check finds warnings; errors always stop the run."
    )
    near_threshold: float = Field(
        0.8,
        gt=0.0,
        le=1.0,
        description="How alike two examples must be to count as near duplicates: the Jaccard similarity of their "
        "character 5-grams for examples of about 30 words or more; shorter ones may differ in (1 - near_threshold) "
        "x 160 5-grams (32 at 0.8: one changed word or three typos). Their answers must also agree (the same words "
        "and numbers in order, typos aside; answers of 100+ words may differ in a few words, never a number).",
    )
    train_on: Literal["assistant", "all"] = Field(
        "assistant",
        description="Which tokens carry loss: only assistant/completion tokens, or every token.",
    )
    reasoning: Literal["learn", "context"] = Field(
        "learn",
        description="Assistant turns' reasoning (reasoning_content): learned with the answer, or kept in the "
        "context without loss.",
    )


class LoraConfig(Section):
    r: int = Field(16, gt=0, description="LoRA rank: the width of the low-rank update matrices.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator; the update is scaled by alpha/r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input during training.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Modules that get LoRA: 'all-linear' or a comma-separated list such as q_proj,v_proj.",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "all-linear":
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


class QloraConfig(Section):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base weights.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["fp32", "bf16", "fp16"] | None = Field(
        None,
        description="Dtype the 4-bit weights are dequantized to for each matmul; null follows train.dtype.",
    )


class AdapterConfig(Section):
    reduction_factor: int = Field(
        16, gt=0, description="Bottleneck width is hidden_size / reduction_factor (Houlsby/Pfeiffer adapters)."
    )
    placement: Literal["attention", "mlp", "both"] = Field(
        "both", description="Insert adapters after the attention block, the MLP block, or both."
    )
    activation: Literal["relu", "gelu", "silu"] = Field("relu", description="Non-linearity inside the bottleneck.")


class FullConfig(Section):
    freeze_embeddings: bool = Field(False, description="Keep the input embeddings (and a tied output layer) frozen.")
    top_k_layers: int | None = Field(
        None, gt=0, description="Train only the top k transformer layers (plus the final norm and output layer)."
    )


class TrainConfig(Section):
    lr: float = Field(2e-4, gt=0, description="Peak learning rate of AdamW.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps to run; overrides epochs.")
    batch_size: int = Field(8, gt=0, description="Examples per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated into one optimizer step.")
    packing: bool = Field(
        False,
        description="Lay a batch's examples end to end in rows of data.max_length tokens, attention kept "
        "inside each example (no padding); pays when lengths vary a lot. False: length-grouped padding.",
    )
    share_prefixes: bool = Field(
        True,
        description="Compute the tokens a micro-batch's examples all begin with (a system prompt, a tools block; "
        "never a learned token) once, in one row whose attention mask keeps the examples apart, where that leaves "
        "out at least a quarter of the batch's tokens and the model's attention takes such a mask (sdpa, eager; "
        "no sliding window shorter than an example). The loss and gradients are the same; false: never.",
    )
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="Share of steps spent warming up the lr.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate decay after warmup.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, description="Clip the gradient norm to this; null disables clipping.")
    seed: int = Field(42, description="Seed for data order, splitting, dropout and initialisation.")
    log_every: int = Field(1, gt=0, description="Write a metrics.jsonl line every this many steps.")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="When the loss or gradient norm is NaN/inf: stop with a diagnosis, or skip that step "
        "(no update; the run stops after 5 skipped steps in a row).",
    )
    spike_factor: float = Field(
        3.0, gt=1.0, description="Log a loss spike when a step's loss exceeds this multiple of the smoothed loss."
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Compute dtype. auto: bf16 on GPUs with bf16 and on CPUs with AMX or AVX512-BF16, fp16 with "
        "loss scaling on older GPUs, fp32 on CPUs without bf16 instructions. Adapter methods keep the frozen base "
        "in this dtype (trainable weights and optimizer state stay fp32); full fine-tuning keeps fp32 master "
        "weights under autocast.",
    )
    gradient_checkpointing: bool = Field(
        True,
        description="Recompute each layer's activations during the backward pass instead of keeping them: "
        "activation memory stops growing with depth for about a quarter more compute (TRL's default too).",
    )
    release_memory: Literal["auto", "off", "step", "layer"] = Field(
        "auto",
        description="Hand freed memory back to the OS (glibc malloc_trim), which otherwise keeps freed activations "
        "resident on CPU: after each step (cheap), or also after each layer's forward and backward (lowest peak "
        "RSS, measured ~30% slower on Gemma 3 270M). auto: step on CPU, off on GPU.",
    )
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="Attention kernel: auto (flash_attention_2 on a GPU when flash-attn is installed, else "
        "sdpa), sdpa, eager, or flash_attention_2 (GPU; packed rows use its varlen path).",
    )
    liger_kernels: bool = Field(
        False, description="Patch the model with Liger's fused Triton kernels (GPU, needs the liger-kernel package)."
    )
    compile: bool = Field(
        False, description="torch.compile each decoder layer in place before training (slow first steps)."
    )


# The built-in metrics' names, part of the config's vocabulary as the method names are; evaluate.metrics implements
# exactly these (it checks so when imported), so a config is validated without importing the metrics.
METRIC_NAMES = (
    "accuracy", "bleu", "chrf", "chrf_corpus", "exact_match", "json_fields", "json_fields_f1", "json_schema",
    "json_valid", "macro_f1",
    "no_call_accuracy", "rouge_l", "token_f1", "tool_args_match", "tool_call_exact", "tool_call_parse_rate",
    "tool_name_accuracy",
)  # fmt: skip


def check_metric_names(names: list[str]) -> list[str]:
    for name in names:
        if name not in METRIC_NAMES and ":" not in name:
            close = difflib.get_close_matches(name, METRIC_NAMES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown metric {name!r}; {hint}known: {', '.join(METRIC_NAMES)}, or module:function")
    return names


def split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


# A list of metric names: "a,b" on the command line splits at commas; each name must be known or module:function.
MetricNames = Annotated[list[str], BeforeValidator(split_commas), AfterValidator(check_metric_names)]


class ValidationConfig(Section):
    every: int | None = Field(
        None, gt=0, description="Validate every this many optimizer steps; null: ten times per run."
    )
    limit: int | None = Field(200, gt=0, description="Validation examples scored for val loss; null for all.")
    metrics: MetricNames = Field(
        [],
        description="Task metrics (names as in eval.metrics) generated on a validation sample at each validation "
        "(slower than val loss).",
    )
    generate_limit: int = Field(16, gt=0, description="Validation examples generated for the task metrics.")
    best_metric: str = Field(
        "val_loss",
        description="What picks the best checkpoint: val_loss (lower is better), one of metrics, or val_reward "
        "(grpo: the combined reward of greedy answers to the val prompts).",
    )
    patience: int | None = Field(
        None, gt=0, description="Stop early after this many validations without a better best_metric; null: never."
    )
    load_best_at_end: bool = Field(
        False, description="Save the best checkpoint's weights as the run's model instead of the last step's."
    )

    @model_validator(mode="after")
    def _best_is_known(self) -> ValidationConfig:
        if self.best_metric not in ("val_loss", "val_reward") and self.best_metric not in self.metrics:
            raise ValueError(
                f"best_metric {self.best_metric!r} must be val_loss, val_reward (grpo) or one of validation.metrics "
                f"{self.metrics}"
            )
        return self


class CheckpointConfig(Section):
    every: int | None = Field(
        None, gt=0, description="Write a checkpoint every this many steps; null: at each validation (and at the end)."
    )
    keep_last: int = Field(
        2, ge=1, description="Newest checkpoints kept; older ones are deleted (the best is kept too)."
    )
    keep_best: bool = Field(True, description="Also keep the checkpoint with the best validation metric.")


class TrackingConfig(Section):
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        [], description="Experiment trackers besides metrics.jsonl (each needs its package installed)."
    )
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI; default: a SQLite store at <run>/mlflow.db (no server needed)."
    )
    wandb_project: str = Field("tunesmith", description="Weights & Biases project.")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="Weights & Biases mode; offline writes files you can `wandb sync` later."
    )

    @field_validator("trackers", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        return split_commas(value)


class EvalConfig(Section):
    limit: int | None = Field(50, gt=0, description="Test examples to generate for the comparison; null for all.")
    max_new_tokens: int = Field(128, gt=0, description="Most tokens generated per answer.")
    batch_size: int = Field(8, gt=0, description="Prompts generated together.")
    temperature: float = Field(
        0.0, ge=0.0, description="Sampling temperature for eval/compare; 0 is greedy (deterministic, the default)."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling share when temperature > 0.")
    metrics: MetricNames = Field(
        ["exact_match"],
        description="Metrics for evaluation and the base-versus-tuned comparison: "
        + ", ".join(METRIC_NAMES)
        + ", or a custom module:function / file.py:function taking (prediction, reference) and returning a number "
        "(code: run only when named on the command line or in a config you pass, else with --allow-code).",
    )
    schema_path: str | None = Field(None, description="JSON Schema file for the json_schema metric.")
    shots: int | None = Field(
        None,
        ge=0,
        description="Solved training examples in the prompt of compare's few-shot baseline (the base model prompted "
        "with examples, which fine-tuning must beat); null: as many as fit the model's context with room for the "
        "answer, at most 4; 0: no few-shot baseline.",
    )
    similar_shots: bool = Field(
        False, description="Give each few-shot question the training examples most like it instead of random ones."
    )
    bootstrap: int = Field(2000, ge=100, description="Paired bootstrap resamples for the confidence intervals.")
    lm_eval_tasks: list[str] = Field(
        [],
        description="lm-evaluation-harness tasks run on base and tuned by compare, to catch forgetting of general "
        "ability (needs pip install lm-eval).",
    )
    lm_eval_include_path: str | None = Field(
        None,
        description="Folder of your own lm-eval task YAML files (they can hold code: read only when named on the "
        "command line or in a config you pass, else with --allow-code).",
    )
    lm_eval_limit: int | None = Field(200, gt=0, description="Items per lm-eval task; null for all.")
    seed: int = Field(0, description="Seed of the bootstrap and permutation tests.")

    @field_validator("lm_eval_tasks", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        return split_commas(value)


OBJECTIVE_BETA = {"dpo": 0.1, "ipo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0}  # the papers' usual starts


class PreferenceConfig(Section):
    beta: float | None = Field(
        None,
        gt=0.0,
        description="Strength of the preference term. dpo/ipo/kto: how far the model may move from the reference "
        "(higher: closer); orpo: the odds-ratio term's weight (lambda); simpo: the reward scale. Default per "
        "objective: " + ", ".join(f"{k} {v}" for k, v in OBJECTIVE_BETA.items()) + ".",
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="dpo: the share of pairs assumed mislabelled (conservative DPO)."
    )
    gamma: float = Field(0.5, ge=0.0, description="simpo: the target reward margin between chosen and rejected.")
    desirable_weight: float = Field(1.0, gt=0.0, description="kto: weight of the desirable examples' loss.")
    undesirable_weight: float = Field(1.0, gt=0.0, description="kto: weight of the undesirable examples' loss.")

    def beta_for(self, objective: str) -> float:
        return self.beta if self.beta is not None else OBJECTIVE_BETA[objective]


class RewardConfig(Section):
    """One reward of objective grpo: exactly one of metric, regex, length, code or model says what it scores."""

    metric: str | None = Field(
        None,
        description="A per-item metric of eval.metrics (exact_match, json_valid, json_schema, json_fields, "
        "json_fields_f1 (list fields scored by the F1 of their items, in any order), token_f1, "
        "chrf, accuracy, rouge_l, tool_args_match and the other tool metrics) scored against the example's reference "
        "answer; json_schema uses eval.schema_path.",
    )
    regex: str | None = Field(
        None, description="A format reward: 1 when the completion matches this Python regular expression, else 0."
    )
    fullmatch: bool = Field(False, description="regex: the whole completion must match, not just a part of it.")
    length: int | None = Field(
        None,
        gt=0,
        description="A length penalty: 0 up to this many completion tokens, then falling linearly to -1 at "
        "rl.max_completion_tokens (against reward hacking by length).",
    )
    code: str | None = Field(
        None,
        description="Your own reward, file.py:function or module:function, called as function(prompt, completion, "
        "example) -> float or None (None: skip this completion). Code: run only when named on the command line or "
        "in a config you pass, else with --allow-code.",
    )
    model: str | None = Field(
        None, description="A reward model run (objective reward_model) that scores each prompt and completion."
    )
    weight: float = Field(1.0, description="This reward's weight in the combined reward (a weighted sum).")
    timeout_s: float = Field(
        10.0, gt=0.0, description="code: seconds one call may take; a slower call skips its completion (counted)."
    )
    name: str | None = Field(
        None,
        description="The name it is logged under (reward_<name>); default: the metric, the code's function "
        "name, or the kind (regex, length, model).",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> RewardConfig:
        kinds = [k for k in ("metric", "regex", "length", "code", "model") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                f"a reward names exactly one of metric, regex, length, code or model (got {kinds or 'none'})"
            )
        if self.metric is not None and self.metric not in METRIC_NAMES:
            check_metric_names([self.metric])
        if self.metric in ("bleu", "chrf_corpus", "macro_f1"):
            raise ValueError(f"metric {self.metric!r} scores a whole corpus, not one completion: use chrf or accuracy")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("metric", "regex", "length", "code", "model") if getattr(self, k) is not None)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.code is not None:
            return self.code.rpartition(":")[2] or "code"
        return self.metric if self.metric is not None else self.kind


class RlConfig(Section):
    group_size: int = Field(8, ge=2, description="Completions sampled per prompt (one group, compared with itself).")
    prompts_per_step: int = Field(
        4, gt=0, description="Prompts whose groups one rollout trains on (train.batch_size rows run per forward)."
    )
    max_completion_tokens: int = Field(128, gt=0, description="Most tokens generated per completion.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling share of the rollouts.")
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = Field(
        "dapo",
        description="How token losses are averaged: grpo (each completion's token mean, then the mean over "
        "completions: short ones weigh more), dr_grpo (the sum over tokens / (completions x max_completion_tokens)), "
        "dapo (the mean over every token of the step: TRL's default).",
    )
    epsilon_low: float = Field(0.2, gt=0.0, lt=1.0, description="PPO clip: the ratio may fall to 1 - epsilon_low.")
    epsilon_high: float | None = Field(
        None, gt=0.0, description="PPO clip: the ratio may rise to 1 + epsilon_high (DAPO: 0.28); null: epsilon_low."
    )
    iterations: int = Field(
        1,
        gt=0,
        description="Optimizer steps per batch of rollouts; after the first, the ratio is against the sampling "
        "policy's log-probabilities (clipped).",
    )
    scale_advantages: Literal["group", "batch", "none"] = Field(
        "group",
        description="Divide advantages by the std of the rewards in their group (GRPO), of the whole step, or not "
        "at all (Dr. GRPO).",
    )
    rloo: bool = Field(
        False, description="Baseline each completion by the mean of the OTHER completions of its group (RLOO)."
    )
    beta: float = Field(
        0.0,
        ge=0.0,
        description="Weight of the k3 KL penalty against the starting model; 0 needs no reference. Adapter methods "
        "compute the reference with the adapter switched off (no second copy of the weights).",
    )
    dynamic_sampling: bool = Field(
        True,
        description="Drop groups whose rewards are all equal (no signal) and sample new prompts in their place, "
        "up to max_draws rounds per step (DAPO); the dropped groups are counted.",
    )
    max_draws: int = Field(3, gt=0, description="dynamic_sampling: rounds of rollouts at most per step.")
    overlong: Literal["mask", "penalty", "none"] = Field(
        "mask",
        description="Completions that hit max_completion_tokens: mask (left out of the advantages and the loss), "
        "penalty (a penalty over the last overlong_buffer tokens, -1 at the limit, DAPO) or none (scored as cut).",
    )
    overlong_buffer: int | None = Field(
        None, gt=0, description="overlong penalty: the tokens before the limit where it grows; null: a quarter."
    )
    share_prompts: bool = Field(
        True,
        description="In the update, compute each group's prompt once for all its completions in a micro-batch "
        "(one row, a mask that keeps completions apart) where the model's attention takes such a mask (sdpa, "
        "eager); false: each completion in its own padded row with its own copy of the prompt.",
    )
    rewards: list[RewardConfig] = Field(
        [], description="The rewards, summed with their weights: [{metric: exact_match}, {regex: '^{.*}$'}, ...]."
    )

    @property
    def clip_high(self) -> float:
        return self.epsilon_high if self.epsilon_high is not None else self.epsilon_low

    @property
    def buffer(self) -> int:
        return self.overlong_buffer or max(1, self.max_completion_tokens // 4)


class RunConfig(Section):
    name: str | None = Field(None, description="Run name; defaults to the last part of out, else 'run'.")
    model: str = Field(
        DEFAULT_MODEL,
        description=(
            "Base model: 'gemma-3-270m' or 'smollm2-135m' (embedded), a Hugging Face hub id, a local directory or "
            "a .gguf file."
        ),
    )
    method: Literal["lora", "qlora", "dora", "adapter", "full"] = Field(
        "lora",
        description="Fine-tuning technique: lora (recommended start), qlora (4-bit base + LoRA), dora "
        "(weight-decomposed LoRA), adapter (bottleneck layers), full (every weight).",
    )
    objective: Literal["sft", "dpo", "ipo", "orpo", "kto", "simpo", "reward_model", "grpo"] = Field(
        "sft",
        description="What the method trains toward: sft (imitate the answers: the default), or a preference "
        "objective on pairs of a chosen and a rejected answer: dpo, ipo (DPO's squared variant), orpo (SFT plus an "
        "odds-ratio term, no reference), simpo (length-normalised, no reference), or kto (single answers marked "
        "desirable or not). dpo, ipo and kto measure against the model the run starts from. reward_model trains a "
        "scalar head on the same pairs (Bradley-Terry): a scorer that compare rates by held-out pair accuracy. "
        "grpo: online RL, the model's own sampled answers rewarded by rl.rewards.",
    )
    preference: PreferenceConfig = Field(
        default_factory=PreferenceConfig, description="Preference objectives' settings (objective other than sft)."
    )
    rl: RlConfig = Field(
        default_factory=RlConfig,  # type: ignore[arg-type]  # mypy without pydantic's plugin, as the sections here
        description="Online RL settings (objective: grpo).",
    )
    init_from: str | None = Field(
        None,
        description="Start from an earlier run's trained weights (e.g. runs/sft) instead of the base model: the "
        "usual SFT then DPO path. LoRA-family runs continue the earlier run's adapter (same method), full runs its "
        "model; the earlier run is also the reference of dpo/ipo/kto.",
    )
    out: str | None = Field(None, description="Run directory; defaults to runs/<name>.")
    chat_template: str | None = Field(
        None,
        description="Jinja chat template; defaults to the tokenizer's, else tunesmith's plain template.",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Where the examples come from.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings (methods lora, qlora, dora).")
    qlora: QloraConfig = Field(default_factory=QloraConfig, description="4-bit base settings (method: qlora).")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="Bottleneck adapters (method: adapter).")
    full: FullConfig = Field(default_factory=FullConfig, description="Full fine-tuning options (method: full).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation settings.")
    validation: ValidationConfig = Field(
        default_factory=ValidationConfig, description="Validation during training, best checkpoint, early stopping."
    )
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints for resuming.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Experiment trackers.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Base-versus-tuned comparison.")
    resume: bool | Literal["auto"] = Field(
        False,
        description="Continue the run in out from its last complete checkpoint: true, false, or auto (resume "
        "when the run directory has a checkpoint, else start fresh).",
    )

    @model_validator(mode="after")
    def _rl_has_rewards(self) -> RunConfig:
        if self.objective == "grpo" and not self.rl.rewards:
            raise ValueError("objective grpo needs rl.rewards, e.g. [{metric: exact_match}] or [{regex: '^{.*}$'}]")
        if self.validation.best_metric.startswith("val_reward") and self.objective != "grpo":
            raise ValueError(f"validation.best_metric {self.validation.best_metric} is measured by objective grpo only")
        return self

    @model_validator(mode="after")
    def _name_from_out(self) -> RunConfig:
        if self.name is None:
            object.__setattr__(self, "name", Path(self.out).name if self.out else "run")
        if self.out is None:
            object.__setattr__(self, "out", str(Path("runs") / str(self.name)))
        return self

    @property
    def run_dir(self) -> Path:
        return Path(str(self.out))


# Short command-line flags for the fields people set most; every field also has --section.field.
# rl.beta, rl.temperature and rl.top_p share their names with fields that had the short flags first: those keep them.
FLAG_ALIASES = {
    "data.path": "--data",
    "preference.beta": "--beta",
    "eval.temperature": "--temperature",
    "eval.top_p": "--top-p",
}


def leaf_fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, Any]]:
    """Every settable field as (dotted path, pydantic FieldInfo), sections expanded."""
    leaves = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            leaves.extend(leaf_fields(annotation, f"{prefix}{name}."))
        else:
            leaves.append((f"{prefix}{name}", info))
    return leaves


def flag_names(dotted: str, unique_leaves: set[str]) -> list[str]:
    """Command-line flags for a field: the alias or bare name where unambiguous, and --section.field."""
    leaf = dotted.rsplit(".", 1)[-1]
    flags = []
    if dotted in FLAG_ALIASES:
        flags.append(FLAG_ALIASES[dotted])
    elif "." not in dotted or leaf in unique_leaves:
        flags.append("--" + leaf.replace("_", "-"))
    if "." in dotted:
        flags.append("--" + dotted)
    return flags


def unique_leaf_names() -> set[str]:
    counts: dict[str, int] = {}
    for dotted, _ in leaf_fields():
        leaf = dotted.rsplit(".", 1)[-1]
        counts[leaf] = counts.get(leaf, 0) + 1
    top = set(RunConfig.model_fields)
    return {leaf for leaf, n in counts.items() if n == 1 and leaf not in top}


def choices(info: Any) -> list[str]:
    """The allowed values of a Literal field (also inside an Optional or list), for help texts."""
    found: list[str] = []
    stack = [info.annotation]
    while stack:
        annotation = stack.pop()
        if get_origin(annotation) is Literal:
            found.extend(str(arg) for arg in get_args(annotation))
        else:
            stack.extend(get_args(annotation))
    return found


def parse_value(text: str, info: Any = None) -> Any:
    """Turn a command-line value into YAML's reading of it (numbers, booleans, null, lists).

    Plain text fields keep the text as typed, so a Jinja template or a path is never read as YAML.
    """
    if info is not None and info.annotation in (str, str | None):
        return None if text in ("null", "None") and info.annotation is not str else text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise TunesmithError(f"--set {dotted}: '{part}' is a value, not a section.")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> None:
    """Apply `key.path=value` overrides (the --set flag) to a raw config tree."""
    for item in overrides:
        if "=" not in item:
            raise TunesmithError(f"--set {item!r}: expected KEY=VALUE, for example --set train.lr=1e-4.")
        key, _, value = item.partition("=")
        key = key.strip()
        # The field's type decides, as for its own flag: `--set name=2024` and `--name 2024` give the text "2024".
        set_dotted(tree, key, parse_value(value.strip(), dict(leaf_fields()).get(key)))


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = RunConfig
    for part in loc:
        annotation = model.model_fields.get(str(part))
        if annotation is None or not (
            isinstance(annotation.annotation, type) and issubclass(annotation.annotation, BaseModel)
        ):
            break
        model = annotation.annotation
    return list(model.model_fields)


def _describe(error: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    dotted = ".".join(str(part) for part in loc)
    if error["type"] == "extra_forbidden":
        valid = _fields_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else "valid keys here: " + ", ".join(valid)
        return f"{dotted}: unknown key; {hint}"
    return f"{dotted}: {error['msg']} (got {error.get('input')!r})"


def build_config(tree: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a raw config tree; every problem is reported with its dotted key."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        problems = "\n".join(f"  - {_describe(err)}" for err in exc.errors())
        raise TunesmithError(f"{source} has {exc.error_count()} problem(s):\n{problems}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TunesmithError(f"Config file {path} not found. Pass a YAML file, or use flags such as --model.")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise TunesmithError(f"{path}{where}: not valid YAML ({exc}).") from None
    if not isinstance(tree, dict):
        raise TunesmithError(f"{path}: the top level must be a mapping of keys such as model:, data:, train:.")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start from defaults), apply --set overrides and validate."""
    tree = read_config_file(path) if path else {}
    apply_overrides(tree, overrides or [])
    return build_config(tree, source=str(path) if path else "command line")


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
