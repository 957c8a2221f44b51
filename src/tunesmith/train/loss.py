"""Next-token loss computed only where tokens carry loss, without materialising the full logits.

With a 262k-token vocabulary the logits of a batch dwarf the model's activations. The output layer
runs only on the hidden states that predict a loss token, in chunks that are recomputed in the
backward pass, so peak memory holds one chunk of logits at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100
# fp32 logits held per chunk: 64 tokens of a 262k vocabulary, 512 of 32k. 64 MiB measured as fast as
# 256 MiB on Gemma 3 270M (CPU) and lowered its peak RSS by ~0.6 GiB (logits, softmax and their grads).
CHUNK_BYTES = 64 * 2**20


def chunk_tokens(vocab_size: int) -> int:
    """Loss tokens per output-layer chunk, so one chunk's logits stay near CHUNK_BYTES whatever the vocabulary."""
    return max(16, CHUNK_BYTES // (4 * vocab_size))


def _logits(hidden: torch.Tensor, head: torch.nn.Module, softcap: float | None) -> torch.Tensor:
    """fp32 logits of one chunk, soft-capped where the model does so (Gemma 2)."""
    logits = head(hidden).float()
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def _chunk_loss(
    hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, softcap: float | None
) -> torch.Tensor:
    return F.cross_entropy(_logits(hidden, head, softcap), targets, reduction="sum")


def _after(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states that predict a label (labels[t + 1] from hidden[t], wherever it is not IGNORE) and those
    labels, flat in row-major order."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    return hidden[:, :-1][keep], targets[keep]


def _answer_chunks(
    compute: Any,
    selected: torch.Tensor,
    wanted: torch.Tensor,
    head: torch.nn.Module,
    softcap: float | None,
    chunk_size: int | None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """`compute` (hidden, targets, head, softcap) on each chunk of the selected hidden states and their targets,
    recomputed in the backward pass when gradients are on; yields (the chunk's slice of them, result)."""
    chunk_size = chunk_size or chunk_tokens(head.weight.shape[0])
    for start in range(0, wanted.numel(), chunk_size):
        piece = slice(start, start + chunk_size)
        if torch.is_grad_enabled():
            yield piece, checkpoint(compute, selected[piece], wanted[piece], head, softcap, use_reentrant=False)
        else:
            yield piece, compute(selected[piece], wanted[piece], head, softcap)


def answer_loss_sum(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: torch.nn.Module,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of predicting labels[t + 1] from hidden[t] wherever that label is not IGNORE."""
    return predicted_loss_sum(*_after(hidden, labels), head, softcap, chunk_size)


def predicted_loss_sum(
    selected: torch.Tensor,
    wanted: torch.Tensor,
    head: torch.nn.Module,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of the wanted tokens given their hidden states, a chunk of the output layer at a time."""
    if _frozen(head):
        return -token_logps(selected, wanted, head, softcap, chunk_size, entropy=False)[0].sum()
    total = selected.new_zeros((), dtype=torch.float32)
    for _, loss in _answer_chunks(_chunk_loss, selected, wanted, head, softcap, chunk_size):
        total = total + loss
    return total


def _decoder_hidden(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The decoder's last hidden states for a batch; works for plain and PEFT-wrapped causal LMs."""
    mask = batch.get("attention_mask")
    inputs: dict[str, Any]
    if mask is not None and mask.dim() == 4:  # shared prefixes (batching.share_prefixes): the mask is the layout
        inputs = {"attention_mask": _mask_for(model, mask), "position_ids": batch["position_ids"]}
    elif "position_ids" in batch:  # packed: no mask, so transformers derives a block-diagonal one from positions
        inputs = {"position_ids": batch["position_ids"]}
    else:
        inputs = {"attention_mask": mask}
    return model.get_decoder()(input_ids=batch["input_ids"], use_cache=False, **inputs).last_hidden_state


MAX_SHARED_ROW = 8192  # tokens of one shared-prefix row (batching.share_prefixes) at most: its mask is row x row
SHARED_ATTENTION = ("sdpa", "eager")  # attention kernels that take any 4D mask (flash-attention's varlen path doesn't)


def share_limit(model: Any) -> int | None:
    """The longest sequence this model computes exactly in a batching.share_prefixes row: None where its attention
    kernel takes no 4D mask; its sliding window where it has one (the mask serves every layer as it is)."""
    config = model.config
    if getattr(config, "_attn_implementation", None) not in SHARED_ATTENTION:
        return None
    return getattr(config, "sliding_window", None) or MAX_SHARED_ROW


def shares_prefixes(model: Any, longest: int) -> bool:
    """Whether this model computes share_prefixes rows of sequences up to `longest` tokens exactly."""
    limit = share_limit(model)
    return limit is not None and longest <= limit


def _mask_for(model: Any, allowed: torch.Tensor) -> torch.Tensor:
    """A boolean 4D mask as the model's attention kernel takes it: SDPA the booleans, eager an additive float."""
    if model.config._attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, torch.finfo(torch.float32).min)


def _predicting(hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states that predict a learned token and those tokens: through `sources` and `targets` in a
    shared-prefix row (batching.share_prefixes), else by the labels (row-major)."""
    if "sources" in batch:
        return hidden.reshape(-1, hidden.shape[-1])[batch["sources"]], batch["targets"]
    return _after(hidden, batch["labels"])


def model_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run the decoder, then the chunked answer-only loss."""
    softcap = getattr(model.config, "final_logit_softcapping", None)
    selected, wanted = _predicting(_decoder_hidden(model, batch), batch)
    return predicted_loss_sum(selected, wanted, model.get_output_embeddings(), softcap)


def _chunk_logps(
    hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, softcap: float | None
) -> torch.Tensor:
    return _logits(hidden, head, softcap).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def answer_logps(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: torch.nn.Module,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the summed fp32 log-probability of labels[t + 1] given hidden[t] over the non-IGNORE labels, and
    how many such tokens the row has (float). Same selected positions and chunks as answer_loss_sum."""
    keep = labels[:, 1:] != IGNORE
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(keep)[keep]
    sums = hidden.new_zeros(labels.shape[0], dtype=torch.float32)
    selected, wanted = _after(hidden, labels)
    if _frozen(head):
        sums = sums.index_add(0, rows, token_logps(selected, wanted, head, softcap, chunk_size, entropy=False)[0])
    else:
        for piece, logps in _answer_chunks(_chunk_logps, selected, wanted, head, softcap, chunk_size):
            sums = sums.index_add(0, rows[piece], logps)
    return sums, keep.sum(dim=1).float()


def model_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the decoder as model_loss_sum does, then answer_logps: per row, the answer's summed log-probability and
    its token count. Each row must hold one sequence: on a packed row the sum would run across its sequences."""
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return answer_logps(_decoder_hidden(model, batch), batch["labels"], model.get_output_embeddings(), softcap)


def _chunk_token_stats(
    hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, softcap: float | None
) -> torch.Tensor:
    """Per token: the target's log-probability and (detached) the entropy of the distribution, as [tokens, 2]."""
    logps = _logits(hidden, head, softcap).log_softmax(-1)
    entropy = -(logps.exp() * logps).sum(-1).detach()
    return torch.stack([logps.gather(-1, targets[:, None]).squeeze(-1), entropy], dim=-1)


def _frozen(head: torch.nn.Module) -> bool:
    """A plain output layer whose weight is not trained (adapter methods): FrozenHead computes through it."""
    return type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad


class FrozenHead(torch.autograd.Function):
    """Per token, log p(target) and the entropy of the distribution through an output layer that is not trained,
    with its gradient worked out in the forward: d log p / d hidden = W[target] - softmax @ W (through the soft cap
    where the model has one) is one vector per token, so the forward keeps those and no logits, and the backward
    only scales them by the incoming gradient. Checkpointing the plain ops instead computes the logits twice and
    log-softmax and the entropy twice, and runs three products with the output layer per chunk where this runs two.
    Any loss that depends on the hidden states only through these log-probabilities (cross-entropy, preference
    log-ratios, GRPO's clipped ratio) gets its exact gradient. The products run in the dtype autocast gives them
    in the forward, the weight's otherwise."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                softcap: float | None, entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        with torch.autocast(device, enabled=False):
            logits = F.linear(hidden.to(dtype), weight.to(dtype)).float()
            capped = torch.tanh(logits / softcap) * softcap if softcap else logits
            logps = capped - torch.logsumexp(capped, -1, keepdim=True)
            probabilities = logps.exp()
            spread = -(probabilities * logps).sum(-1) if entropy else logps.new_zeros(0)
            picked = logps.gather(-1, targets[:, None]).squeeze(-1)
            if ctx.needs_input_grad[0]:
                grad = probabilities.neg_()  # d log p(target) / d logit = one-hot(target) - softmax
                grad.scatter_add_(-1, targets[:, None], torch.ones_like(picked)[:, None])
                if softcap:  # through the cap c * tanh(z / c): times 1 - (capped / c)^2
                    grad.mul_(1 - (capped / softcap) ** 2)
                ctx.save_for_backward((grad.to(dtype) @ weight.to(dtype)).to(hidden.dtype))
        ctx.mark_non_differentiable(spread)
        return picked, spread

    @staticmethod
    def backward(ctx: Any, grad_logps: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (jacobian,) = ctx.saved_tensors
        return jacobian * grad_logps[:, None].to(jacobian.dtype), None, None, None, None


def token_logps(
    selected: torch.Tensor,
    wanted: torch.Tensor,
    head: torch.nn.Module,
    softcap: float | None = None,
    chunk_size: int | None = None,
    entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 log-probability of each wanted token given its selected hidden state, and the entropy of that
    distribution (detached, for logging; empty with entropy=False where the head is frozen), in their order, a
    chunk of the output layer at a time: through FrozenHead where the layer is not trained, else the recomputed
    path of answer_logps."""
    if not _frozen(head):
        parts = [stats for _, stats in _answer_chunks(_chunk_token_stats, selected, wanted, head, softcap, chunk_size)]
        both = torch.cat(parts) if parts else selected.new_zeros((0, 2), dtype=torch.float32)
        return both[:, 0], both[:, 1].detach()
    weight: torch.Tensor = head.weight  # type: ignore[assignment]  # _frozen: a plain Linear's
    size = chunk_size or chunk_tokens(weight.shape[0])
    pieces = [
        FrozenHead.apply(selected[start : start + size], weight, wanted[start : start + size], softcap, entropy)
        for start in range(0, wanted.numel(), size)
    ]
    if not pieces:
        return selected.new_zeros(0, dtype=torch.float32), selected.new_zeros(0, dtype=torch.float32)
    return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])


def model_token_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the decoder as model_loss_sum does, then token_logps: per answer token, its log-probability and the
    entropy of the model's distribution there; flat in the order of `labels[:, 1:] != IGNORE` (row-major), or of
    `targets` for shared-prefix rows (batching.share_prefixes)."""
    softcap = getattr(model.config, "final_logit_softcapping", None)
    selected, wanted = _predicting(_decoder_hidden(model, batch), batch)
    return token_logps(selected, wanted, model.get_output_embeddings(), softcap)
