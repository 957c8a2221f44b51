"""The decoder's forward pass for generation, written out for the families whose layers we know (Gemma 3, Llama,
Mistral, Qwen 2/3), so that a decode step runs the model's own modules and nothing else.

transformers' forward builds masks, wraps every layer call in keyword plumbing, decorators and output capture; on
a CPU decode step that Python costs as much as the weights' read. Here the engine's masks and SlotCache go straight
to the layers. Every projection, norm, embedding and rotary module is called as a module, so LoRA layers (merged or
not, switched off by `disable_adapter`), packed weights and fused norms of `generation_view` act as in the model's
forward, and the arithmetic is the same ops in the same order: the same logits.

An engine step goes further where the weights are packed for tunesmith's kernel (`step`): each layer is one call
of kernels.decode_layer over the step's tokens (decoding rows and a prompt chunk), C++ that rounds where the model
rounds, so a step costs the weights' read and little else.

It must never change what is computed: a model whose bypassed modules (the model, its layers, attention, MLP) are of
another class or carry hooks (bottleneck adapters, FSDP) is not taken, and the engine uses the model's forward.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tunesmith import kernels

# Causal LM class -> its decoder layer, attention and MLP classes: the modules this forward replaces, whose forward
# it restates. Sandwich norms (Gemma 3's pre/post feed-forward norms) and q/k norms are read off the layer.
FAMILIES = {
    "Gemma3ForCausalLM": ("Gemma3DecoderLayer", "Gemma3Attention", "Gemma3MLP"),
    "LlamaForCausalLM": ("LlamaDecoderLayer", "LlamaAttention", "LlamaMLP"),
    "MistralForCausalLM": ("MistralDecoderLayer", "MistralAttention", "MistralMLP"),
    "Qwen2ForCausalLM": ("Qwen2DecoderLayer", "Qwen2Attention", "Qwen2MLP"),
    "Qwen3ForCausalLM": ("Qwen3DecoderLayer", "Qwen3Attention", "Qwen3MLP"),
}

# RMSNorm classes whose forward is known: Gemma's scales by (1 + weight) in float32 before rounding; Llama's (and
# these others') rounds first, then scales by weight in the model's dtype.
ONE_PLUS_WEIGHT_NORMS = {"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"}
WEIGHT_AFTER_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "SmolLM3RMSNorm"}
# Decoder.greedy's screen: the weight of each step in the running average of its exact work (the entries it
# computed exactly, as a share of one whole output layer), the average past which the screen rests, and for how many
# steps. A step of the screen costs about half a read of the output layer plus its exact work (a row computed whole:
# a whole read), so it stops paying near 0.4; it rests well before.
SCREEN_RATE, SCREEN_MOST_WORK, SCREEN_REST = 0.1, 0.2, 256
SCREEN_REST_BYTES = 128 * 2**20  # the largest bf16 output layer for which the screen may rest
# The activations of the MLP gate that tunesmith's native layer computes: name in the config -> GELU (else SiLU)
GATE_ACTIVATIONS = {"gelu_pytorch_tanh": True, "gelu_tanh": True, "silu": False, "swish": False}


class Decoder:
    """`decoder(ids, positions, masks, cache)`: the logits of each row's last position, as the model's own forward
    with `logits_to_keep=1` gives them. `masks` maps a layer type to its mask (one mask: every layer)."""

    def __init__(self, causal_lm: Any) -> None:
        self.lm = causal_lm
        self.body = causal_lm.model
        config = self.body.config
        self.layer_types: list[str] = list(getattr(config, "layer_types", None) or [])
        self.softcap: float | None = getattr(config, "final_logit_softcapping", None)
        self.attention: Callable[..., Any] = ALL_ATTENTION_FUNCTIONS.get_interface(
            config._attn_implementation, _eager_of(causal_lm)
        )
        self.rotate = sys.modules[type(causal_lm).__module__].apply_rotary_pos_emb
        # Gemma 3 keeps one rotary table per layer type (local and global RoPE bases)
        self.rotary_by_type = "layer_type" in _parameters(self.body.rotary_emb.forward)
        self.plans: dict[tuple, list[kernels.LayerWeights] | None] = {}  # adapter state -> native layers
        # the running average of the screen's exact work, and how many more steps it rests after that grew too
        # large (`greedy`)
        self.screen_work = 0.0
        self.screen_rest = 0

    @classmethod
    def of(cls, model: Any) -> Decoder | None:
        """The decoder of a model (a PEFT model's base included), or None where this forward cannot stand in."""
        inner = model.get_base_model() if _peft(model) else model
        if inner is not model and not (_plain(model) and _plain(model.base_model)):
            return None
        classes = FAMILIES.get(type(inner).__name__)
        body = getattr(inner, "model", None)
        if classes is None or body is None or not hasattr(body, "layers") or not _plain(model):
            return None
        for layer in body.layers:
            kinds = (type(layer).__name__, type(layer.self_attn).__name__, type(layer.mlp).__name__)
            if kinds != classes or not all(map(_plain, (layer, layer.self_attn, layer.mlp))):
                return None
        return cls(inner) if _plain(inner) and _plain(body) else None

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, masks: Any, cache: Any) -> torch.Tensor:
        hidden = self.body.embed_tokens(ids)
        tables = self._rotary(hidden, positions)
        for index, layer in enumerate(self.body.layers):
            kind = self.layer_types[index] if self.layer_types else "full_attention"
            mask = masks.get(kind, masks.get("full_attention")) if isinstance(masks, dict) else masks
            hidden = self._layer(layer, hidden, tables[kind if self.rotary_by_type else ""], mask, cache)
        return self._logits(hidden[:, -1:])

    def _rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> dict[str, Any]:
        """The rotary tables (cos, sin) of these positions: one per layer type, or one under "" where the model
        keeps one for all layers."""
        rotary = self.body.rotary_emb
        if self.rotary_by_type:
            return {kind: rotary(hidden, positions, kind) for kind in set(self.layer_types)}
        return {"": rotary(hidden, positions)}

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        """The output layer over the last positions' hidden states (final norm and Gemma's soft cap included)."""
        logits = self.lm.lm_head(self.body.norm(last))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def step(self, ids: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, keep: list[int],
             cache: Any) -> torch.Tensor | None:  # fmt: skip
        """One engine step through tunesmith's native layer (kernels.decode_layer, one call a layer) over any mix
        of tokens: ids[i] of the row in cache slot slots[i] at positions[i] (decoding rows' next tokens and a chunk
        of a prompt, read with the same pass over the weights). Returns the logits of the tokens at `keep`
        ([len(keep), vocabulary]), as `__call__` gives them up to the order of the attention's sums; None where
        the model is not in a state the native layer computes (weights not packed for the kernel, per-row
        adapters, an unmerged adapter, another activation or norm)."""
        hidden = self.run(ids, slots, positions, keep, cache)
        return None if hidden is None else self._logits(hidden)

    def run(self, ids: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, keep: list[int],
            cache: Any) -> torch.Tensor | None:  # fmt: skip
        """`step` up to the output layer: the last layer's hidden states of the tokens at `keep` (`logits` or
        `greedy` of them finish the step), or None where the native layer cannot run."""
        layers = self._plan()
        if layers is None or cache.keys[0].dtype != torch.bfloat16:
            return None
        hidden = self.body.embed_tokens(ids[None])  # [1, tokens, width]: one sequence of positions for the tables
        count = ids.shape[0]
        tables = {kind: (cos.reshape(count, -1), sin.reshape(count, -1))
                  for kind, (cos, sin) in self._rotary(hidden, positions[None]).items()}  # fmt: skip
        flat = hidden.reshape(count, -1)
        for index, layer in enumerate(layers):
            cos, sin = tables[self.layer_types[index] if self.rotary_by_type else ""]
            flat = kernels.decode_layer(flat, positions, slots, cos, sin, cache.keys[index], cache.values[index], layer)
        return flat[keep] if len(keep) < count else flat

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer over hidden states `run` gave ([rows, width] -> [rows, vocabulary])."""
        return self._logits(hidden)

    def greedy(self, hidden: torch.Tensor) -> list[int | None] | None:
        """The greedy pick of each row of `run`'s hidden states without computing its logits, through the output
        layer's int8 screen (kernels.greedy: the pick torch.argmax gives over that row's logits from the kernel's
        product for one row); None for a row it cannot decide, or for all where the output layer has no screen (not
        packed for the kernel, an adapter or hooks on it, Gemma 2's soft cap).

        A model whose distributions are flat (a random adapter, a base model rambling on a prompt it never learned)
        leaves rows the screen cannot narrow, and a row computed whole costs a whole read of the output layer on
        top of the screen's: where the screen's exact work has averaged more than SCREEN_MOST_WORK of the output
        layer over recent steps, it rests for SCREEN_REST steps (None: the caller computes logits, through a
        bf16-packed copy of the output layer) and then tries again; only where that copy is small
        (SCREEN_REST_BYTES: SmolLM2's 57 MB, not Gemma's 335 MB, which would take compare past its memory, and
        whose rare whole rows cost about what its product does)."""
        head = self.lm.lm_head
        made = getattr(vars(head).get("forward"), "screen", None)
        if made is None or self.softcap is not None or head.bias is not None or not _plain(head, patched=True):
            return None
        if self.screen_rest > 0:
            self.screen_rest -= 1
            return None
        screen = made()
        if screen is None:
            return None
        picks, computed = kernels.greedy(self.body.norm(hidden), head.weight, screen)
        work = min(1.0, float(computed.sum()) / head.weight.shape[0])
        self.screen_work += SCREEN_RATE * (work - self.screen_work)
        if self.screen_work > SCREEN_MOST_WORK and head.weight.numel() * 2 <= SCREEN_REST_BYTES:
            self.screen_rest, self.screen_work = SCREEN_REST, SCREEN_MOST_WORK / 2
        return [pick if pick >= 0 else None for pick in picks.tolist()]

    def _plan(self) -> list[kernels.LayerWeights] | None:
        """The native layers for the adapters as they are set now, made once per adapter state and view (keyed by
        the view's patched forward itself, not its id: a later view's could reuse a freed id)."""
        first = self.body.layers[0].self_attn.q_proj
        key: tuple = (vars(first).get("forward"), getattr(first, "disable_adapters", None))
        key += tuple(getattr(first, "active_adapters", ()))
        if key not in self.plans:
            self.plans[key] = self._native_layers()
        return self.plans[key]

    def _native_layers(self) -> list[kernels.LayerWeights] | None:
        config = self.body.config
        activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
        gelu = GATE_ACTIVATIONS.get(str(activation))
        if gelu is None or getattr(config, "attn_logit_softcapping", None) or not kernels.pays():
            return None
        window = int(getattr(config, "sliding_window", None) or 0)
        layers = []
        for index, layer in enumerate(self.body.layers):
            attention, mlp = layer.self_attn, layer.mlp
            projections = [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj]
            packed = [_packed(module) for module in (*projections, mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
            sandwich = hasattr(layer, "pre_feedforward_layernorm")
            modules = [
                layer.input_layernorm,
                layer.post_attention_layernorm if sandwich else None,
                layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm,
                layer.post_feedforward_layernorm if sandwich else None,
                getattr(attention, "q_norm", None),
                getattr(attention, "k_norm", None),
            ]
            norms = [_norm(module) if module is not None else (None, None, None) for module in modules]
            present = [norm for norm in norms if norm[0] is not None]
            if any(entry is None for entry in packed) or len(present) != sum(m is not None for m in modules):
                return None
            if len({(eps, after) for _, eps, after in present}) != 1:
                return None  # one eps and one norm kind in a layer
            sliding = self.layer_types and self.layer_types[index] == "sliding_attention"
            layers.append(
                kernels.LayerWeights(
                    weights=[weight.data for weight, _ in packed],  # type: ignore[misc]
                    features=[weight.out_features for weight, _ in packed],  # type: ignore[misc]
                    # float32 once here: the kernel adds float32 biases and would convert bf16 ones every call
                    biases=[None if bias is None else bias.detach().float() for _, bias in packed],  # type: ignore[misc]
                    norms=[scale for scale, _, _ in norms],
                    eps=present[0][1],
                    weight_after=present[0][2],
                    heads=config.num_attention_heads,
                    kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                    head_dim=attention.head_dim,
                    scaling=float(attention.scaling),
                    window=window if sliding else 0,
                    gelu=gelu,
                )
            )
        return layers

    def _layer(self, layer: Any, hidden: torch.Tensor, rotary: Any, mask: Any, cache: Any) -> torch.Tensor:
        sandwich = hasattr(layer, "pre_feedforward_layernorm")  # Gemma: norms before and after each block
        update = self._attend(layer.self_attn, layer.input_layernorm(hidden), rotary, mask, cache)
        if sandwich:
            update = layer.post_attention_layernorm(update)
        hidden = hidden + update
        mlp = layer.mlp
        inner = layer.pre_feedforward_layernorm(hidden) if sandwich else layer.post_attention_layernorm(hidden)
        update = mlp.down_proj(mlp.act_fn(mlp.gate_proj(inner)) * mlp.up_proj(inner))
        if sandwich:
            update = layer.post_feedforward_layernorm(update)
        return hidden + update

    def _attend(self, attention: Any, hidden: torch.Tensor, rotary: Any, mask: Any, cache: Any) -> torch.Tensor:
        shape = (*hidden.shape[:-1], -1, attention.head_dim)
        query = attention.q_proj(hidden).view(shape).transpose(1, 2)
        key = attention.k_proj(hidden).view(shape).transpose(1, 2)
        value = attention.v_proj(hidden).view(shape).transpose(1, 2)
        if hasattr(attention, "q_norm"):
            query, key = attention.q_norm(query), attention.k_norm(key)
        query, key = self.rotate(query, key, *rotary)
        key, value = cache.update(key, value, attention.layer_idx)
        output, _ = self.attention(
            attention, query, key, value, mask, dropout=0.0, scaling=attention.scaling,
            sliding_window=getattr(attention, "sliding_window", None),
        )  # fmt: skip
        return attention.o_proj(output.reshape(*hidden.shape[:-1], -1).contiguous())


def _packed(module: Any) -> tuple[Any, torch.Tensor | None] | None:
    """The kernel-packed weight and bias a linear layer computes with now (`generation_view`'s), or None."""
    packed = getattr(vars(module).get("forward"), "packed", None)
    found = packed() if packed is not None and _plain(module, patched=True) else None
    return found if found is not None and found[0].native else None


def norm_scale(module: Any) -> tuple[torch.Tensor, float, bool] | None:
    """A known RMSNorm's float32 scale (Gemma's 1 + weight, Llama's weight), eps, and kind (True: Llama's, the
    weight applied after rounding); None for any other module."""
    kind, weight = type(module).__name__, getattr(module, "weight", None)
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or eps is None:
        return None
    if kind in ONE_PLUS_WEIGHT_NORMS:
        return 1.0 + weight.detach().float(), float(eps), False
    if kind in WEIGHT_AFTER_NORMS:
        return weight.detach().float(), float(eps), True
    return None


def _norm(module: Any) -> tuple[torch.Tensor | None, Any, bool]:
    """norm_scale of a norm the native layer may stand in for (no hooks); (None, None, False) otherwise."""
    known = norm_scale(module) if _plain(module, patched=True) else None
    return known if known is not None else (None, None, False)


def _peft(model: Any) -> bool:
    """A PEFT model (its forward only hands the call to the base model's), not some other wrapper."""
    return any(cls.__name__ == "PeftModel" and cls.__module__.startswith("peft.") for cls in type(model).__mro__)


def _plain(module: Any, patched: bool = False) -> bool:
    """No hooks that a restated forward would skip (`patched`: generation_view's instance-level forward allowed)."""
    return not (
        getattr(module, "_forward_hooks", None)
        or getattr(module, "_forward_pre_hooks", None)
        or (not patched and "forward" in vars(module))  # an instance-level forward (patched): not the class's
    )


def _eager_of(causal_lm: Any) -> Callable[..., Any]:
    return sys.modules[type(causal_lm).__module__].eager_attention_forward


def _parameters(function: Callable[..., Any]) -> set[str]:
    return set(inspect.signature(function).parameters)
