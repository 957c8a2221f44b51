"""Memory, compute, time and cost of a fine-tune, from the model's config alone (no weights needed).

First principles only: parameter counts from the architecture, bytes per value from the dtype each value
really has in the run (train/precision.py), FLOPs as 6·N·T (full) or 4·N·T (adapter methods) plus attention.
No constant here is fitted to a price or a benchmark except HERE_UTILIZATION (this machine's share of its
measured matmul speed, set from the quickstart); where the estimate and a measurement disagree, the report
says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # these import torch; the CLI reads the device table and defaults below without it
    from tunesmith.methods.method import MemoryTerms
    from tunesmith.train.precision import Precision

# Device table: memory (GiB), dense bf16 peak TFLOP/s, on-demand USD per hour (typical cloud list
# prices, overridable with --prices). Every GPU here computes in bf16. "cpu" is filled in from this
# machine at run time.
DEVICES: dict[str, dict[str, float]] = {
    "RTX 4090 24GB": {"memory_gib": 24, "tflops": 165, "usd_per_hour": 0.40},
    "L4 24GB": {"memory_gib": 24, "tflops": 121, "usd_per_hour": 0.80},
    "A100 40GB": {"memory_gib": 40, "tflops": 312, "usd_per_hour": 1.30},
    "A100 80GB": {"memory_gib": 80, "tflops": 312, "usd_per_hour": 1.80},
    "H100 80GB": {"memory_gib": 80, "tflops": 989, "usd_per_hour": 2.50},
    "H200 141GB": {"memory_gib": 141, "tflops": 989, "usd_per_hour": 3.50},
}
DEFAULT_GPU = "RTX 4090 24GB"  # the device `plan` recommends for unless told another
CPU_ROW = "this machine (CPU)"
UTILIZATION = 0.4  # share of a table GPU's peak FLOP/s a fine-tune reaches (MFU), for time and cost unless told
# Share of this machine's measured matmul FLOP/s (plan/probe.py) that training reaches, counted in the FLOPs of
# training_flops: the rest of a step (attention, norms, the optimizer, the small adapter matmuls, Python) and the
# FLOPs it counts but never runs (the input embedding is a lookup) fill the difference. Set from the quickstart
# (Gemma 3 270M LoRA, bf16, 2 threads, 3.3e13 FLOPs) on two CPUs: 163 s where the probe's bf16 matmul runs at
# ~680 GFLOP/s (AVX512-BF16, share 0.30); 7.6 s a step, ~360 s in all, at ~500 GFLOP/s (AMX, share 0.22). 0.25
# puts both within 30% (+19%, -26%): how much of the probe's speed a step reaches differs between CPUs.
HERE_UTILIZATION = 0.25
GIB = 1024**3
USABLE = 0.9  # share of a GPU's memory left after the caching allocator's fragmentation (the context is a term)
# What a process holds on a GPU besides its tensors: driver state, the kernels loaded so far, cuBLAS and cuDNN
# handles; torch.cuda.memory_allocated() does not count it. With lazy module loading (torch sets it since 1.13)
# the bare context is ~0.27 GiB (pytorch/pytorch#86509: 287 MB lazy, 667 MB eager); with the libraries and
# kernels of a training step loaded it is commonly ~0.5 GiB on recent GPUs, the figure taken here (`plan
# --measure` on a GPU reports the context it finds).
CUDA_CONTEXT_BYTES = 512 * 2**20
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BYTES = 0.5 + 0.127 / 8  # 4-bit values plus double-quantized block constants (~0.127 bit/value)
FP32 = 4  # trainable weights, their gradients and the loss's logits are fp32 in every run dtype
ADAM_STATE_BYTES = 8  # two fp32 moments per trainable value
GRAD_BYTES = 4  # fp32 gradients of trainable values
# Peak memory is what stays all along plus the largest phase of a step: the loss chunk's buffers, a recomputed
# layer and the optimizer's temporaries are never alive together. Gradients count whole in every phase (at the
# loss only the output layer's exist: an upper bound).
PERSISTENT = ("weights", "trainable_weights", "optimizer", "cuda_context")
PHASES = {
    "loss": ("autocast_copies", "activations", "logits_loss", "gradients"),
    "backward": ("autocast_copies", "activations", "layer_recompute", "gradients"),
    "optimizer step": ("gradients", "optimizer_step"),
    # objective grpo: sampling, between updates (no_grad): the engine's KV cache and the LoRA layers' merged weights
    "rollout": ("kv_cache", "merged_weights"),
}
# Terms that shard over devices (FSDP/ZeRO-3); the others stay whole on each device.
SHARDED = ("weights", "trainable_weights", "gradients", "optimizer", "autocast_copies", "optimizer_step")


def table_precision(setting: str, model_type: str | None = None) -> Precision:
    """The dtype a run of train.dtype `setting` computes in on the device table's GPUs (all have bf16)."""
    from tunesmith.train.precision import Precision, resolve

    if setting == "auto":
        return Precision("bf16", "train.dtype auto: bf16, which every GPU in the device table supports")
    return resolve(setting, device="cuda", model_type=model_type)  # refuses fp16 where the model overflows in it


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_config(cls, config: Any) -> Shape:
        config = getattr(config, "text_config", None) or config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            vocab=config.vocab_size,
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            intermediate=config.intermediate_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
        )

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of every linear layer in one decoder layer: attention and a gated MLP."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears())

    @property
    def total_params(self) -> int:
        norms = self.layers * 2 * self.hidden + self.hidden
        head = 0 if self.tied else self.embedding_params
        return self.embedding_params + self.linear_params + norms + head


@dataclass
class Workload:
    method: str = "lora"
    lora_r: int = 16
    lora_dropout: float = 0.05
    adapter_reduction: int = 16
    batch_size: int = 8
    seq_len: int = 512
    answer_share: float = 0.5  # share of tokens that carry loss (the output layer runs only on those)
    tokens: float = 1e6  # training tokens in total (all epochs)
    gradient_checkpointing: bool = False
    dtype: str = "bf16"  # the run's compute dtype (train.dtype resolved): fp32 | bf16 | fp16
    qlora_compute_dtype: str | None = None  # qlora.compute_dtype; None follows dtype
    # objective grpo: the sequences a step trains on (rl.prompts_per_step x rl.group_size), the rows the engine
    # samples at once and their length (the longest prompt + rl.max_completion_tokens), which size its KV cache,
    # and the tokens the rollouts run forward over the run (no backward)
    step_sequences: int = 0
    rollout_rows: int = 0
    rollout_length: int = 0
    rollout_tokens: float = 0.0

    @property
    def terms(self) -> MemoryTerms:
        """The method's memory facts, from its registry entry (methods/)."""
        from tunesmith.methods import METHODS

        return METHODS[self.method].memory

    @property
    def compute_dtype(self) -> str:
        """Dtype of the frozen base's dense weights and of the activations (QLoRA: its compute dtype)."""
        if self.terms.quantized_base and self.qlora_compute_dtype:
            return self.qlora_compute_dtype
        return self.dtype

    @property
    def residual_dtype(self) -> str:
        """Dtype of the hidden states between layers: the embeddings' (fp32 master weights when the base trains)."""
        return "fp32" if self.terms.trains_base else self.compute_dtype

    @classmethod
    def for_run(
        cls,
        config: Any,
        examples: list[Any] | None = None,
        seq_len: int | None = None,
        tokens: float | None = None,
        dtype: str | None = None,
    ) -> Workload:
        """The workload of a run config; with its tokenized examples, the p95 sequence length, the share of
        tokens carrying loss and the training tokens come from the data (explicit values win). `dtype`
        defaults to what train.dtype resolves to on this machine, where a run of this config trains."""
        answer_share = 0.5
        from tunesmith.objectives import objective_of

        # Preference objectives run two sequences per example through the model (chosen and rejected; KTO's
        # answer and its mismatched one): twice the rows of a batch.
        rows = 1 if objective_of(config).holds == "sft" else 2
        train, rollout = config.train, Rollout.of(config, examples)
        if examples:
            lengths = sorted(len(e) for e in examples)
            seq_len = seq_len or lengths[int(0.95 * (len(lengths) - 1))]
            answer_share = sum(sum(e.loss_mask) for e in examples) / max(1, sum(lengths))
            if not tokens:
                mean = sum(lengths) / len(lengths)
                per_step = (rollout.step_sequences or rows * train.batch_size * train.grad_accum) * mean
                tokens = train.max_steps * per_step if train.max_steps else sum(lengths) * train.epochs
                tokens *= rollout.epoch_factor if not train.max_steps else 1
        if dtype is None:
            from tunesmith.train.precision import resolve

            dtype = resolve(config.train.dtype).name
        return cls(
            method=config.method,
            lora_r=config.lora.r,
            lora_dropout=config.lora.dropout,
            adapter_reduction=config.adapter.reduction_factor,
            batch_size=min(rows * train.batch_size, rollout.step_sequences or rows * train.batch_size),
            seq_len=seq_len or config.data.max_length,
            answer_share=answer_share,
            tokens=tokens or 1e6,
            gradient_checkpointing=train.gradient_checkpointing,
            dtype=dtype,
            qlora_compute_dtype=config.qlora.compute_dtype,
            step_sequences=rollout.step_sequences,
            rollout_rows=rollout.rows,
            rollout_length=rollout.length or config.data.max_length,
            rollout_tokens=(tokens or 1e6) / rollout.iterations if rollout.rows else 0.0,
        )


@dataclass(frozen=True)
class Rollout:
    """What objective grpo adds to a run's workload (all 0 for other objectives): the sequences each step trains on,
    the engine's rows and their length, how many steps train on one rollout, and per epoch how many sequences
    stand for each prompt (rl.group_size completions, rl.iterations steps on them)."""

    step_sequences: int = 0
    rows: int = 0
    length: int = 0
    iterations: int = 1
    epoch_factor: int = 1

    @classmethod
    def of(cls, config: Any, examples: list[Any] | None) -> Rollout:
        """`examples` are grpo's planned rows (objectives/rl.py: planned_rows): each prompt with a full-length
        completion, so the longest is the engine's row length."""
        if config.objective != "grpo":
            return cls()
        from tunesmith.objectives.rl import MAX_ROWS

        rl = config.rl
        sequences = rl.prompts_per_step * rl.group_size
        length = max((len(e) for e in examples), default=0) if examples else 0
        return cls(sequences, min(sequences, MAX_ROWS), length, rl.iterations, rl.group_size * rl.iterations)


@dataclass
class Estimate:
    params: int
    trainable_params: int
    memory_bytes: dict[str, int]
    peak_memory_bytes: int
    peak_phase: str
    flops: float
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def trainable_params(shape: Shape, work: Workload) -> int:
    terms = work.terms
    if terms.trains_base:
        return shape.total_params
    if terms.update == "bottleneck":
        width = max(1, shape.hidden // work.adapter_reduction)
        return shape.layers * 2 * (2 * shape.hidden * width + width + shape.hidden)
    per_layer = sum(work.lora_r * (a + b) for a, b in shape.linears())
    if terms.magnitudes:
        per_layer += sum(b for _, b in shape.linears())  # one magnitude per output feature
    return shape.layers * per_layer


def weight_bytes(shape: Shape, work: Workload) -> int:
    """The base weights: fp32 masters for full fine-tuning (autocast computes from them), else the frozen base
    in the compute dtype (QLoRA: its linear weights in 4 bits)."""
    if work.terms.trains_base:
        return shape.total_params * FP32
    dense = DTYPE_BYTES[work.compute_dtype]
    if work.terms.quantized_base:
        rest = shape.total_params - shape.linear_params
        return int(shape.linear_params * NF4_BYTES + rest * dense)
    return shape.total_params * dense


def autocast_copy_bytes(shape: Shape, work: Workload, trainable: int) -> int:
    """16-bit copies of the trained matrices: autocast casts each fp32 weight a matmul uses once and caches the
    copy until the step's autocast region ends, after the backward pass (the loop runs both inside it)."""
    if work.dtype == "fp32":
        return 0
    # Full: every linear and the output layer (the input embedding is a lookup, never cast); else the adapters.
    matrices = shape.linear_params + shape.embedding_params if work.terms.trains_base else trainable
    return matrices * DTYPE_BYTES[work.dtype]


def layer_activation_bytes(shape: Shape, work: Workload) -> int:
    """Bytes autograd keeps for the backward pass per token and decoder layer, each value in its dtype.

    For a Llama-style block (SDPA keeps no seq x seq score matrix):
    - the two RMSNorms compute in fp32 and keep their input upcast (2·hidden fp32); when their weights train
      (full) they also keep their output, in the residual dtype (2·hidden);
    - attention: q, k, v as projected, after the rotary embedding, and the attention output (3·q + 3·kv),
      and the gated MLP's gate, up and activation (3·intermediate), in the compute dtype;
    - when the base trains (full), the linears' inputs for the weight gradients: the MLP product
      (intermediate), and in 16-bit the norms' outputs cast for the matmuls (2·hidden);
    - LoRA on all linear layers: each adapted layer's input, width 5·hidden + q + intermediate in all. With
      dropout every layer keeps an fp32 mask plus its dropped input (compute dtype); without, in 16-bit each
      keeps its own copy (PEFT casts the input to the fp32 adapter, autocast casts it back), in fp32 the
      three distinct inputs (2·hidden + intermediate) are kept once;
    - DoRA: as LoRA, plus each adapted layer's output twice (the base result it rescales and the rescaled
      one), compute dtype; the merged weights whose norms it takes are not counted;
    - bottleneck adapters: per adapter its input, down-projection and activation (hidden + 2·width).
    Checked against autograd's saved tensors on a 4-layer Llama for full, LoRA and DoRA (dropout 0 and 0.05)
    and adapters in fp32 and bf16: within 3% of the saved bytes per token, except adapters (9-10% high) and
    full bf16 (6% low).
    """
    h, q, kv, i = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
    compute, residual = DTYPE_BYTES[work.compute_dtype], DTYPE_BYTES[work.residual_dtype]
    sixteen_bit = work.compute_dtype != "fp32"
    per_token = 2 * h * FP32 + (3 * q + 3 * kv + 3 * i) * compute
    terms = work.terms
    if terms.trains_base:
        per_token += 2 * h * residual + i * compute + (2 * h * compute if sixteen_bit else 0)
    elif terms.update == "bottleneck":
        width = max(1, h // work.adapter_reduction)
        per_token += 2 * (h + 2 * width) * compute
    else:
        adapted = sum(inputs for inputs, _ in shape.linears())  # 5·hidden + q + intermediate
        if work.lora_dropout > 0:
            per_token += adapted * (FP32 + compute)
        else:
            per_token += adapted * compute if sixteen_bit else (2 * h + i) * FP32
        if terms.magnitudes:
            per_token += 2 * sum(outputs for _, outputs in shape.linears()) * compute
    return per_token


def activation_bytes(shape: Shape, work: Workload) -> int:
    """Activations kept from the forward pass into the backward: every layer's (see layer_activation_bytes),
    or with gradient checkpointing only each layer's input, in the residual dtype."""
    tokens = work.batch_size * work.seq_len
    if work.gradient_checkpointing:
        return tokens * shape.layers * shape.hidden * DTYPE_BYTES[work.residual_dtype]
    return tokens * shape.layers * layer_activation_bytes(shape, work)


def kv_cache_bytes(shape: Shape, work: Workload) -> int:
    """objective grpo: the generation engine's KV cache, allocated once per rollout for every row it samples at
    once: layers x rows x kv heads x length x head dim x 2 (keys and values), in the dtype of the model's
    parameters (fp32 master weights when the base trains, else the compute dtype)."""
    values = shape.layers * work.rollout_rows * shape.kv_heads * work.rollout_length * shape.head_dim * 2
    return values * DTYPE_BYTES[work.residual_dtype]


def merged_weight_bytes(shape: Shape, work: Workload) -> int:
    """objective grpo, LoRA: a rollout samples with each adapted layer merged (W + scale * B @ A, generation.py:
    generation_view), a copy of every linear weight in the compute dtype while it samples. DoRA and QLoRA layers
    sample unmerged."""
    terms = work.terms
    if not work.rollout_rows or terms.update != "low_rank" or terms.quantized_base or terms.magnitudes:
        return 0
    return shape.linear_params * DTYPE_BYTES[work.compute_dtype]


def loss_bytes(shape: Shape, work: Workload) -> int:
    """The chunked output layer (train/loss.py) for one chunk of loss tokens while its backward runs: the saved
    log-softmax, its incoming gradient and the gradient it passes back, fp32 vocab-wide rows in every dtype
    (the logits are cast to fp32 first; the 16-bit output and its gradient come and go before and after)."""
    from tunesmith.train.loss import chunk_tokens

    loss_tokens = min(chunk_tokens(shape.vocab), max(1, int(work.batch_size * work.seq_len * work.answer_share)))
    return 3 * loss_tokens * shape.vocab * FP32


def optimizer_step_bytes(shape: Shape, work: Workload, trainable: int, gpu: bool) -> int:
    """AdamW's temporaries while it steps. On a GPU torch's foreach implementation takes sqrt(v) of every
    trainable value at once (4 bytes each); on CPU it steps one tensor at a time, holding two temporaries the
    size of the largest (sqrt(v), then its division)."""
    if gpu:
        return trainable * FP32
    if work.terms.trains_base:
        largest = max(shape.embedding_params, *(a * b for a, b in shape.linears()))
    elif work.terms.update == "bottleneck":
        largest = shape.hidden * max(1, shape.hidden // work.adapter_reduction)
    else:
        largest = work.lora_r * max(max(pair) for pair in shape.linears())
    return 2 * largest * FP32


def memory_breakdown(shape: Shape, work: Workload, gpu: bool = True) -> dict[str, int]:
    """Every term of training memory in bytes (see PHASES for which are alive together); the CUDA context and
    the foreach optimizer's temporaries only on a GPU."""
    trainable = trainable_params(shape, work)
    memory = {
        "weights": weight_bytes(shape, work),
        # Adapter methods' weights in fp32 over the frozen base (full: the weights themselves, counted above).
        "trainable_weights": 0 if work.terms.trains_base else trainable * FP32,
        "optimizer": trainable * ADAM_STATE_BYTES,
        "gradients": trainable * GRAD_BYTES,
        "autocast_copies": autocast_copy_bytes(shape, work, trainable),
        "activations": activation_bytes(shape, work),
        "layer_recompute": work.batch_size * work.seq_len * layer_activation_bytes(shape, work)
        if work.gradient_checkpointing
        else 0,
        "logits_loss": loss_bytes(shape, work),
        "optimizer_step": optimizer_step_bytes(shape, work, trainable, gpu),
    }
    if work.rollout_rows:
        memory["kv_cache"] = kv_cache_bytes(shape, work)
        memory["merged_weights"] = merged_weight_bytes(shape, work)
    if gpu:
        memory["cuda_context"] = CUDA_CONTEXT_BYTES
    return memory


def peak_bytes(memory: dict[str, int], shards: int = 1) -> tuple[int, str]:
    """Peak memory on one device and the phase it falls in: the persistent terms plus the largest phase; with
    `shards` devices (FSDP/ZeRO-3) each holds 1/shards of the sharded terms."""

    def size(part: str) -> float:
        return memory.get(part, 0) / (shards if part in SHARDED else 1)

    phase = max(PHASES, key=lambda name: sum(size(part) for part in PHASES[name]))
    return math.ceil(sum(size(part) for part in (*PERSISTENT, *PHASES[phase]))), phase


def training_flops(shape: Shape, work: Workload) -> float:
    """6·N·T for full fine-tuning, 4·N·T when the base is frozen (no weight gradients), plus attention; grpo's
    rollouts add a forward pass, 2·N per token, over the tokens they sample."""
    per_param = 6 if work.terms.trains_base else 4
    attention = 2 * shape.layers * work.seq_len * shape.heads * shape.head_dim  # causal: half of 4·s·d·h
    sampling = work.rollout_tokens * (2 * shape.total_params + attention)
    return work.tokens * (per_param * shape.total_params + 3 * attention) + sampling


def estimate(
    shape: Shape,
    work: Workload,
    utilization: float = UTILIZATION,
    prices: dict[str, float] | None = None,
    cpu: dict[str, Any] | None = None,
    cpu_work: Workload | None = None,
) -> Estimate:
    """Memory (on a table GPU, in `work`'s dtype), FLOPs, and per device the count, hours and cost. With `cpu`,
    a row for this machine too (plan/report.py: this_machine), in `cpu_work`'s dtype (default `work`'s), at the
    share of its measured speed it names, with a CUDA context only when it is a GPU."""
    memory = memory_breakdown(shape, work)
    flops = training_flops(shape, work)
    rows = [(name, device, memory) for name, device in DEVICES.items()]
    if cpu:
        here = memory_breakdown(shape, cpu_work or work, gpu=bool(cpu.get("gpu")))
        rows.append((cpu.get("name", CPU_ROW), cpu, here))
    devices = {}
    for name, device, needs in rows:
        price = (prices or {}).get(name, device["usd_per_hour"])
        count = devices_needed(needs, device["memory_gib"] * GIB * USABLE)
        share = device.get("utilization", utilization)
        hours = flops / (device["tflops"] * 1e12 * share * max(1, count or 1)) / 3600
        devices[name] = {
            "fits": count == 1,
            "devices_needed": count,
            "hours": float(f"{hours:.4g}"),
            "cost_usd": None if count is None else float(f"{hours * price * count:.3g}"),
        }
        if "speed" in device:  # this machine's row: what was measured, and the share of it training reaches
            devices[name] |= {"speed": device["speed"], "utilization": share}
    peak, phase = peak_bytes(memory)
    return Estimate(shape.total_params, trainable_params(shape, work), memory, peak, phase, flops, devices)


def devices_needed(memory: dict[str, int], capacity: float, limit: int = 64) -> int | None:
    """Devices of this capacity to hold the run, sharding weights, gradients and optimizer state (FSDP/ZeRO-3);
    activations, the loss buffers and the CUDA context stay whole on each. None when `limit` are not enough."""
    return next((count for count in range(1, limit + 1) if peak_bytes(memory, count)[0] <= capacity), None)


def recommend(shape: Shape, work: Workload, device: str, capacity_bytes: float) -> dict[str, Any]:
    """The technique and batch size that fit one device of this capacity, with the reasons."""
    reasons = []
    fitting: dict[str, tuple[int, bool]] = {}
    for method in ("full", "lora", "qlora"):
        # The largest batch that fits; at equal batch, without checkpointing (it costs ~30% more compute).
        for batch in (16, 8, 4, 2, 1):
            for checkpointing in (False, True):
                trial = Workload(
                    **(asdict(work) | {"method": method, "batch_size": batch, "gradient_checkpointing": checkpointing})
                )
                if estimate(shape, trial).peak_memory_bytes <= capacity_bytes * USABLE:
                    fitting[method] = (batch, checkpointing)
                    break
            if method in fitting:
                break
        if method in fitting:
            batch, checkpointing = fitting[method]
            how = " with gradient checkpointing" if checkpointing else ""
            reasons.append(f"{method} fits one {device} at batch {batch}{how}")
        else:
            full = estimate(
                shape, Workload(**(asdict(work) | {"method": method, "batch_size": 1, "gradient_checkpointing": True}))
            )
            count = devices_needed(full.memory_bytes, capacity_bytes * USABLE)
            need = f"needs {count}x {device} (sharded)" if count else f"does not fit even sharded over {device}s"
            reasons.append(f"{method} {need}")
    if "lora" in fitting:
        choice = "lora"
        reasons.append(
            "LoRA is the recommended start: results comparable to full fine-tuning at a fraction of "
            "the memory; try full fine-tuning only if LoRA falls short"
        )
    elif "qlora" in fitting:
        choice = "qlora"
        reasons.append("the 16/32-bit base does not fit, so QLoRA keeps it in 4 bits")
    elif "full" in fitting:
        choice = "full"
    else:
        choice = None
        reasons.append("no single-device setup fits: use several devices, a smaller model, or shorter sequences")
    batch, checkpointing = fitting.get(choice, (None, None)) if choice else (None, None)
    return {
        "method": choice,
        "device": device,
        "batch_size": batch,
        "gradient_checkpointing": checkpointing,
        "reasons": reasons,
    }
