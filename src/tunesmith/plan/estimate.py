"""Memory, compute, time and cost of a fine-tune, from the model's config alone (no weights needed).

First principles only: parameter counts from the architecture, bytes per value from the dtypes,
FLOPs as 6·N·T (full) or 4·N·T (adapter methods) plus attention. No constant here is fitted to a
price or a benchmark; where the estimate and a measurement disagree, the report says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

# Device table: memory (GiB), dense bf16 peak TFLOP/s, on-demand USD per hour (typical cloud list
# prices, overridable with --prices). "cpu" is filled in from this machine at run time.
DEVICES: dict[str, dict[str, float]] = {
    "RTX 4090 24GB": {"memory_gib": 24, "tflops": 165, "usd_per_hour": 0.40},
    "L4 24GB": {"memory_gib": 24, "tflops": 121, "usd_per_hour": 0.80},
    "A100 40GB": {"memory_gib": 40, "tflops": 312, "usd_per_hour": 1.30},
    "A100 80GB": {"memory_gib": 80, "tflops": 312, "usd_per_hour": 1.80},
    "H100 80GB": {"memory_gib": 80, "tflops": 989, "usd_per_hour": 2.50},
    "H200 141GB": {"memory_gib": 141, "tflops": 989, "usd_per_hour": 3.50},
}
GIB = 1024**3
USABLE = 0.9  # share of a device's memory a training process can use (CUDA context, fragmentation)
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BYTES = 0.5 + 0.127 / 8  # 4-bit values plus double-quantized block constants (~0.127 bit/value)
ADAM_STATE_BYTES = 8  # two fp32 moments per trainable value
GRAD_BYTES = 4  # fp32 gradients of trainable values


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
    adapter_reduction: int = 16
    batch_size: int = 8
    seq_len: int = 512
    answer_share: float = 0.5  # share of tokens that carry loss (the output layer runs only on those)
    tokens: float = 1e6  # training tokens in total (all epochs)
    gradient_checkpointing: bool = False
    weight_dtype: str = "fp32"

    @classmethod
    def for_run(
        cls,
        config: Any,
        examples: list[Any] | None = None,
        seq_len: int | None = None,
        tokens: float | None = None,
        weight_dtype: str = "fp32",
    ) -> Workload:
        """The workload of a run config; with its tokenized examples, the p95 sequence length, the share of
        tokens carrying loss and the training tokens come from the data (explicit values win)."""
        answer_share = 0.5
        if examples:
            lengths = sorted(len(e) for e in examples)
            seq_len = seq_len or lengths[int(0.95 * (len(lengths) - 1))]
            answer_share = sum(sum(e.loss_mask) for e in examples) / max(1, sum(lengths))
            if not tokens:
                train = config.train
                per_step = train.batch_size * train.grad_accum * sum(lengths) / len(lengths)
                tokens = train.max_steps * per_step if train.max_steps else sum(lengths) * train.epochs
        return cls(
            method=config.method,
            lora_r=config.lora.r,
            adapter_reduction=config.adapter.reduction_factor,
            batch_size=config.train.batch_size,
            seq_len=seq_len or config.data.max_length,
            answer_share=answer_share,
            tokens=tokens or 1e6,
            gradient_checkpointing=config.train.gradient_checkpointing,
            weight_dtype=weight_dtype,
        )


@dataclass
class Estimate:
    params: int
    trainable_params: int
    memory_bytes: dict[str, int]
    peak_memory_bytes: int
    flops: float
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def trainable_params(shape: Shape, work: Workload) -> int:
    if work.method == "full":
        return shape.total_params
    if work.method == "adapter":
        width = max(1, shape.hidden // work.adapter_reduction)
        return shape.layers * 2 * (2 * shape.hidden * width + width + shape.hidden)
    per_layer = sum(work.lora_r * (a + b) for a, b in shape.linears())
    if work.method == "dora":
        per_layer += sum(b for _, b in shape.linears())  # one magnitude per output feature
    return shape.layers * per_layer


def weight_bytes(shape: Shape, work: Workload) -> int:
    dense = DTYPE_BYTES[work.weight_dtype]
    if work.method == "qlora":
        rest = shape.total_params - shape.linear_params
        return int(shape.linear_params * NF4_BYTES + rest * dense)
    return shape.total_params * dense


def activation_bytes(shape: Shape, work: Workload) -> int:
    """Values autograd keeps for the backward pass, per the layer's saved tensors.

    Per token and layer: the two norms' inputs and outputs (4·hidden); q, k, v as projected, after the
    rotary embedding, and the attention output (3·q + 3·kv); the gated MLP's gate, up, activation and
    product (4·intermediate). SDPA keeps no seq x seq score matrix. With checkpointing only each layer's
    input is kept, plus one layer's full set while it is recomputed. (Checked against autograd's saved
    tensors on Gemma 3 270M: 16,021 values per token and layer saved, this count gives 14,592; Gemma's
    extra q/k and post-block norms are the difference.)
    """
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per_token_layer = 4 * shape.hidden + 3 * q + 3 * kv + 4 * shape.intermediate
    tokens = work.batch_size * work.seq_len
    bytes_per = 4  # fp32 activations (autocast keeps matmul outputs in bf16 on GPU; fp32 is the safe bound)
    if work.gradient_checkpointing:
        return tokens * bytes_per * (shape.layers * shape.hidden + per_token_layer)
    return tokens * bytes_per * shape.layers * per_token_layer


def loss_bytes(shape: Shape, work: Workload) -> int:
    """The chunked output layer (train/loss.py) for one chunk of loss tokens, fp32, while its backward
    runs: the recomputed logits, the saved log-softmax, the gradient of each, and the softmax temporary
    (5 vocab-wide rows)."""
    from tunesmith.train.loss import chunk_tokens

    loss_tokens = min(chunk_tokens(shape.vocab), max(1, int(work.batch_size * work.seq_len * work.answer_share)))
    return 5 * loss_tokens * shape.vocab * 4


def training_flops(shape: Shape, work: Workload) -> float:
    """6·N·T for full fine-tuning, 4·N·T when the base is frozen (no weight gradients), plus attention."""
    per_param = 6 if work.method == "full" else 4
    attention = 3 * 2 * shape.layers * work.seq_len * shape.heads * shape.head_dim  # causal: half of 4·s·d·h, ×3
    return work.tokens * (per_param * shape.total_params + attention)


def estimate(
    shape: Shape,
    work: Workload,
    utilization: float = 0.4,
    prices: dict[str, float] | None = None,
    cpu: dict[str, float] | None = None,
) -> Estimate:
    trainable = trainable_params(shape, work)
    memory = {
        "weights": weight_bytes(shape, work),
        "gradients": trainable * GRAD_BYTES,
        "optimizer": trainable * ADAM_STATE_BYTES,
        "activations": activation_bytes(shape, work),
        "logits_loss": loss_bytes(shape, work),
    }
    peak = sum(memory.values())
    flops = training_flops(shape, work)
    table = dict(DEVICES)
    if cpu:
        table = table | {"this machine (CPU)": cpu}
    devices = {}
    for name, device in table.items():
        price = (prices or {}).get(name, device["usd_per_hour"])
        count = devices_needed(memory, device["memory_gib"] * GIB * USABLE)
        hours = flops / (device["tflops"] * 1e12 * utilization * max(1, count or 1)) / 3600
        devices[name] = {
            "fits": count == 1,
            "devices_needed": count,
            "hours": float(f"{hours:.4g}"),
            "cost_usd": None if count is None else float(f"{hours * price * count:.3g}"),
        }
    return Estimate(shape.total_params, trainable, memory, peak, flops, devices)


def devices_needed(memory: dict[str, int], capacity: float, limit: int = 64) -> int | None:
    """Devices of this capacity to hold the run, sharding weights, gradients and optimizer (FSDP/ZeRO-3);
    activations and the loss buffer stay per device. None when even `limit` devices are not enough."""
    sharded = memory["weights"] + memory["gradients"] + memory["optimizer"]
    local = memory["activations"] + memory["logits_loss"]
    if local >= capacity:
        return None
    count = max(1, math.ceil(sharded / (capacity - local)))
    return count if count <= limit else None


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
