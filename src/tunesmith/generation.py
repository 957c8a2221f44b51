"""The generation engine: continuous batching over one preallocated KV cache, for every caller that generates.

Rows live in slots 0..n-1 of a cache allocated once per engine (layers x slots x kv-heads x max length x head dim,
in the model's dtype). A request joins at the next step: its prompt is prefilled into a free slot in chunks of
`prefill_chunk` tokens, one chunk per step, so the rows already decoding keep their pace; each step then decodes
one token for every row past its prefill, in one forward pass with each row at its own position (its own RoPE
position and its own mask over the cache). A row that finishes leaves at once: the last row moves into its slot,
so the live rows always form one contiguous block and the attention reads a view, never a gathered copy.

Nothing is concatenated per step: the cache is written in place and the output layer computes the last position only
(`logits_to_keep=1`). Sampling is per row and seeded per request: a seeded request gets the same tokens alone or
beside others. Rows may answer with different adapters of one PEFT model (`Request.adapter`). `generation_view`
is the model as it generates fastest (weights packed for oneDNN, a single adapter merged, fused norms), restored
exactly afterwards; `take` is the one rule that ends a request, for this engine and for llama.cpp's
(deploy/llamacpp.py) alike.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache

from tunesmith import kernels
from tunesmith.decoder import Decoder, norm_scale

BASE = "__base__"  # Request.adapter for the base model's answers (PEFT's own name for a base row of a mixed batch)


@dataclass
class Request:
    """One generation: prompt token ids in, tokens out through `on_token`, until a stop or `max_tokens`."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    # Called after each token with (request, token id); returns True to stop here (a stop text was reached).
    on_token: Callable[[Request, int], bool] | None = None
    cancelled: Callable[[], bool] | None = None
    # A PEFT model's adapter to answer with (BASE: adapters off); None: the model as it is set. Rows of one batch
    # may differ: the step then runs PEFT's mixed batch (each row its own adapter, none merged).
    adapter: str | None = None
    tokens: list[int] = field(default_factory=list)
    # With `logprobs`, each token's log-probability under the distribution it was drawn from (the model's softmax
    # at temperature 1, in float32, before top_p): what an RL objective needs of its rollouts.
    logprobs: bool = False
    token_logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "cancelled" once done
    generator: torch.Generator | None = None


class SlotCache(Cache):
    """A KV cache of fixed slots that a forward pass writes in place: before each pass the engine says which rows
    it runs (`rows`: slots 0..n-1 for decode, one slot for a prefill chunk), where each row writes (`start`), and
    how far the keys that row may see reach (`length`)."""

    def __init__(self, layers: int, slots: int, heads: int, length: int, head_dim: int, dtype: Any, device: Any):
        super().__init__(layers=[])
        shape = (slots, heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slot: int | None = None  # a prefill: the one slot written
        self.rows = 0  # a decode: slots 0..rows-1
        self.start = torch.zeros(1, dtype=torch.long)  # per row: the first position written this pass
        self.span = 0  # the key positions the pass reads: 0..span-1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.slot is not None:  # prefill: one row, a run of positions
            first = int(self.start[0])
            end = first + key_states.shape[2]
            keys[self.slot, :, first:end] = key_states[0]
            values[self.slot, :, first:end] = value_states[0]
            return keys[self.slot : self.slot + 1, :, : self.span], values[self.slot : self.slot + 1, :, : self.span]
        rows = torch.arange(self.rows, device=keys.device)
        keys[rows, :, self.start] = key_states[:, :, 0]
        values[rows, :, self.start] = value_states[:, :, 0]
        return keys[: self.rows, :, : self.span], values[: self.rows, :, : self.span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.span

    def copy(self, source: int, target: int, start: int, end: int) -> None:
        """Copy positions start..end-1 of one slot's keys and values into another's (a shared prompt prefix)."""
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[target, :, start:end] = keys[source, :, start:end]
            values[target, :, start:end] = values[source, :, start:end]

    def move(self, source: int, target: int, end: int) -> None:
        """Copy positions 0..end-1 of one slot's keys and values into another (a finished row's slot takes the last
        row, which has written that far; the rest of a slot is written before it is read)."""
        self.copy(source, target, 0, end)


@dataclass
class _Row:
    request: Request
    position: int = 0  # how many of its tokens are in the cache
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet prefilled
    next_token: int | None = None  # the token to feed at the next decode step


class Engine:
    """Generate for many requests at once on one model; `run` until they are done, or `step` from a serving loop."""

    def __init__(self, model: Any, max_rows: int = 8, max_length: int | None = None, prefill_chunk: int = 256) -> None:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.model, self.config = model, config
        self.max_rows = max_rows
        self.max_length: int = max_length or int(getattr(config, "max_position_embeddings", None) or 2048)
        self.prefill_chunk = prefill_chunk
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        heads: int = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim: int = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.cache = SlotCache(
            config.num_hidden_layers, max_rows, heads, self.max_length, head_dim, self.dtype, self.device
        )
        self.layer_types = getattr(config, "layer_types", None)
        self.window = getattr(config, "sliding_window", None)
        self.eager = getattr(config, "_attn_implementation", "sdpa") == "eager"
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        # transformers 5 names the cache argument `cache`; earlier versions `past_key_values`
        self.cache_argument = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
        self.rows: list[_Row] = []
        self.waiting: list[Request] = []
        self.decoder = Decoder.of(model)  # the forward restated for known families; None: the model's own

    # --- The public loop ------------------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        if len(request.prompt_ids) + request.max_tokens > self.max_length:
            raise ValueError(
                f"a prompt of {len(request.prompt_ids)} tokens and max_tokens {request.max_tokens} exceed this "
                f"engine's {self.max_length}-token cache"
            )
        if request.seed is not None and request.temperature > 0:
            request.generator = torch.Generator(device="cpu").manual_seed(request.seed)
        self.waiting.append(request)

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def run(self, requests: list[Request]) -> list[Request]:
        """Every request generated to its end; returns them (their `tokens` and `finish_reason`)."""
        for request in requests:
            self.submit(request)
        while self.busy:
            self.step()
        return requests

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Admit waiting requests into free slots, prefill one chunk, decode one token for every decoding row;
        returns the requests that finished in this step."""
        while self.waiting and len(self.rows) < self.max_rows:
            request = self.waiting.pop(0)
            self.rows.append(_Row(request, pending=list(request.prompt_ids)))
        finished = self._cancel()
        prefilling = next((index for index, row in enumerate(self.rows) if row.pending), None)
        if prefilling is not None:
            self._reuse_prefix(prefilling)
        native = self._native_step(prefilling)
        if native is not None:
            return finished + native
        if prefilling is not None:
            finished += self._prefill(prefilling)
        if any(row.next_token is not None for row in self.rows):
            finished += self._decode()
        return finished

    # --- Steps ----------------------------------------------------------------------------------------------

    def _native_step(self, prefilling: int | None) -> list[Request] | None:
        """The step as one pass of the decoder's native layer (Decoder.step) over every decoding row's next token
        and the next chunk of the prefilling row's prompt: the weights are read once for both, and the output
        layer runs only for the positions that pick a token. None (nothing done) where the native layer cannot
        take the model as it is set for these rows; the step then runs the model's forward, prefill and decode
        apart."""
        if self.decoder is None:
            return None
        decoding = [index for index, row in enumerate(self.rows) if row.next_token is not None]
        tokens = [self.rows[index].next_token for index in decoding]
        slots, positions = list(decoding), [self.rows[index].position for index in decoding]
        computed = list(decoding)  # the rows this step computes for, and those of them that pick a token
        picking = list(decoding)
        chunk: list[int] = []
        if prefilling is not None:
            row = self.rows[prefilling]
            chunk = row.pending[: self.prefill_chunk]
            tokens += chunk
            slots += [prefilling] * len(chunk)
            positions += range(row.position, row.position + len(chunk))
            computed.append(prefilling)
            if len(chunk) == len(row.pending):  # the prompt's last token picks the first of its answer
                picking.append(prefilling)
        if not tokens:
            return []
        keep = list(range(len(decoding))) + ([len(tokens) - 1] if len(picking) > len(decoding) else [])
        adapters = [self.rows[index].request.adapter for index in computed]
        arguments: dict[str, Any] = {}
        with self._adapters(adapters, arguments):
            if "adapter_names" in arguments:  # rows of several adapters: PEFT's per-row forward
                return None
            hidden = self.decoder.run(
                torch.tensor(tokens), torch.tensor(slots), torch.tensor(positions), keep, self.cache
            )  # fmt: skip
            if hidden is None:
                return None
            picked = self._pick_native(hidden, [self.rows[index].request for index in picking])
        for index in decoding:
            self.rows[index].position += 1
        if prefilling is not None:
            row = self.rows[prefilling]
            row.position += len(chunk)
            row.pending = row.pending[len(chunk) :]
        return self._advance(picking, picked)

    def _pick_native(self, hidden: torch.Tensor, requests: list[Request]) -> list[int]:
        """Each row's next token from the native step's hidden states: greedy rows through the output layer's
        screen (Decoder.greedy, no logits computed) where it decides; the others, and sampled rows, from logits."""
        decoder = self.decoder
        assert decoder is not None  # the native step runs only through it
        picked: list[int | None] = [None] * len(requests)
        plain = [row for row, request in enumerate(requests) if request.temperature <= 0 and not request.logprobs]
        screened = decoder.greedy(hidden[plain]) if plain else None
        for row, pick in zip(plain, screened, strict=True) if screened is not None else []:
            # a row the screen left (values not finite): its logits alone, the screen's arithmetic for one row
            picked[row] = pick if pick is not None else _argmax(decoder.logits(hidden[row : row + 1]))[0]
        rest = [row for row, pick in enumerate(picked) if pick is None]
        if rest:
            logits = decoder.logits(hidden[rest])
            for row, pick in zip(rest, self._pick(logits, [requests[row] for row in rest]), strict=True):
                picked[row] = pick
        return picked  # type: ignore[return-value]

    def _prefill(self, index: int) -> list[Request]:
        row = self.rows[index]
        chunk, row.pending = row.pending[: self.prefill_chunk], row.pending[self.prefill_chunk :]
        cache = self.cache
        cache.slot, cache.start, cache.span = index, torch.tensor([row.position]), row.position + len(chunk)
        positions = torch.arange(row.position, row.position + len(chunk), device=self.device)
        ids = torch.tensor([chunk], device=self.device)
        logits = self._forward(ids, positions[None], positions[None, :, None], [row.request.adapter])
        cache.slot = None
        row.position += len(chunk)
        if row.pending:
            return []
        return self._advance([index], self._pick(logits[:, -1], [row.request]))

    def _reuse_prefix(self, index: int) -> None:
        """Prefix caching: where another live row of the same adapter already holds more of this row's prompt in
        its cache (few-shot prompts that share their shots, a group of RL samples, one system prompt), copy those
        keys and values instead of computing them again. A position's keys and values depend only on the tokens
        up to it, so the row answers as it would have. The prompt's last token is always computed (its logits
        pick the first answer token)."""
        row = self.rows[index]
        prompt, best, source = row.request.prompt_ids, row.position, None
        for other_index, other in enumerate(self.rows):
            if other_index == index or other.request.adapter != row.request.adapter or other.position <= best:
                continue
            shared = _common_prefix(prompt, other.request.prompt_ids, min(other.position, len(prompt) - 1))
            if shared > best:
                best, source = shared, other_index
        if source is not None and best - row.position >= MIN_SHARED_PREFIX:
            self.cache.copy(source, index, row.position, best)
            row.pending = prompt[best:]
            row.position = best

    def _decode(self) -> list[Request]:
        # A row still prefilling rides along on a dummy token at the position its next chunk overwrites.
        tokens = [row.next_token if row.next_token is not None else 0 for row in self.rows]
        positions = torch.tensor([row.position for row in self.rows], device=self.device)
        cache = self.cache
        cache.rows, cache.start, cache.span = len(self.rows), positions, int(positions.max()) + 1
        adapters = [row.request.adapter for row in self.rows]
        ids = torch.tensor(tokens, device=self.device)[:, None]
        logits = self._forward(ids, positions[:, None], positions[:, None, None], adapters)
        decoding = [index for index, row in enumerate(self.rows) if row.next_token is not None]
        for index in decoding:
            self.rows[index].position += 1
        last = logits[:, -1] if len(decoding) == len(self.rows) else logits[decoding, -1]
        return self._advance(decoding, self._pick(last, [self.rows[index].request for index in decoding]))

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, query: torch.Tensor, adapters: list[str | None]
    ) -> torch.Tensor:  # fmt: skip
        """Logits of the last position of each row through the restated forward or the model's own (where the
        native step declined); `query` holds each query's position ([rows, queries, 1])."""
        arguments: dict[str, Any] = {self.cache_argument: self.cache}
        with self._adapters(adapters, arguments):
            restated = self.decoder is not None and "adapter_names" not in arguments
            mask = self._masks(query)
            if restated:
                return self.decoder(ids, positions, mask, self.cache)  # type: ignore[misc]
            output = self.model(
                input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True, logits_to_keep=1,
                **arguments,
            )  # fmt: skip
        return output.logits

    def _adapters(self, adapters: list[str | None], arguments: dict[str, Any]) -> contextlib.AbstractContextManager:
        """Set up one pass for its rows' adapters: one adapter for all (set active, merged where the view merges),
        the base for all (adapters off), or PEFT's per-row `adapter_names`."""
        if all(adapter is None for adapter in adapters):
            return contextlib.nullcontext()
        active = list(getattr(self.model, "active_adapters", None) or [BASE])
        names = [adapter or active[0] for adapter in adapters]
        if len(set(names)) > 1:
            arguments["adapter_names"] = names
            return contextlib.nullcontext()
        if names[0] == BASE:
            return self.model.disable_adapter()
        if active != [names[0]]:
            self.model.set_adapter(names[0])
        return contextlib.nullcontext()

    def _masks(self, query: torch.Tensor) -> Any:
        """Each query's mask over the cache (a causal one, and a sliding one where the model has such layers)."""
        keys = torch.arange(self.cache.span, device=self.device)[None, None, :]
        visible = keys <= query  # causal: a query sees every key up to its own position
        # Prefilling rows ride along in a decode step on padding: their keys beyond `position` are never read later.
        mask: Any = self._mask(visible)
        if self.layer_types and self.window and "sliding_attention" in self.layer_types:
            mask = {"full_attention": mask, "sliding_attention": self._mask(visible & (keys > query - self.window))}
        return mask

    def _mask(self, visible: torch.Tensor) -> torch.Tensor:
        mask = visible[:, None]  # [rows, 1 (heads), queries, keys]
        if self.eager:
            return torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill(
                ~mask, torch.finfo(self.dtype).min
            )
        return mask

    def _advance(self, indices: list[int], picked: list[int]) -> list[Request]:
        """Hand each row its picked next token, and let finished rows leave."""
        done: list[int] = []
        for index, token in zip(indices, picked, strict=True):
            row = self.rows[index]
            request = row.request
            request.finish_reason = take(request, token)
            if request.finish_reason:
                done.append(index)
            else:
                row.next_token = token
        return self._leave(done)

    def _pick(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        greedy = _argmax(logits) if any(request.temperature <= 0 for request in requests) else []
        picked = []
        for row, request in enumerate(requests):
            if request.temperature <= 0:
                picked.append(greedy[row])
                continue
            picked.append(sample(logits[row], request.temperature, request.top_p, request.generator))
        for row, request in enumerate(requests):
            if request.logprobs:
                request.token_logprobs.append(float(torch.log_softmax(logits[row].float(), -1)[picked[row]]))
        return picked

    def _cancel(self) -> list[Request]:
        gone = [index for index, row in enumerate(self.rows) if row.request.cancelled and row.request.cancelled()]
        for index in gone:
            self.rows[index].request.finish_reason = "cancelled"
        return self._leave(gone)

    def _leave(self, indices: list[int]) -> list[Request]:
        """Remove finished rows; the last live row moves into each freed slot, keeping the live rows contiguous."""
        left = []
        for index in sorted(indices, reverse=True):
            left.append(self.rows[index].request)
            last = len(self.rows) - 1
            if index != last:
                self.cache.move(last, index, self.rows[last].position)
                self.rows[index] = self.rows[last]
            self.rows.pop()
        return left


# Shorter shared prefixes are computed again: copying a handful of positions saves less than finding them costs.
MIN_SHARED_PREFIX = 16


def _argmax(logits: torch.Tensor) -> list[int]:
    """Each row's greedy token: over bf16 logits on a CPU through tunesmith's kernel (torch's own copies 262k logits a
    row to float32 first: ~1 ms a row, against ~0.05 ms), else torch's."""
    if kernels.takes(logits):
        return kernels.argmax(logits).tolist()
    return logits.float().argmax(dim=-1).tolist()


def _common_prefix(first: list[int], second: list[int], limit: int) -> int:
    """How many leading tokens the two lists share, up to `limit`."""
    count = 0
    for a, b in zip(first[:limit], second[:limit], strict=False):
        if a != b:
            break
        count += 1
    return count


def take(request: Request, token: int) -> str | None:
    """Add a generated token to its request; the reason it ends there ("stop": a stop id, or `on_token` saw a stop
    text; "length": max_tokens reached), or None to go on. Every generator of answers ends requests by this rule."""
    request.tokens.append(token)
    stopped = request.on_token(request, token) if request.on_token else False
    if token in request.stop_ids or stopped:
        return "stop"
    if len(request.tokens) >= request.max_tokens:
        return "length"
    return None


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from softmax(logits / temperature), restricted to the smallest set whose mass reaches top_p.

    In float64 and shifted so the best logit is 0: any temperature above 0 gives finite scores. The token is drawn
    by inverting the cumulative distribution at one uniform number of the request's generator: exact, and a
    262k-token vocabulary costs one draw instead of torch.multinomial's ~35 ms on a CPU generator."""
    scores = logits.double().cpu()  # the request's seeded generator lives on the CPU, whatever the model's device
    probs = scores.sub_(scores.max()).div_(max(temperature, 1e-300)).exp_()  # unnormalised: the best token has 1
    if top_p < 1.0:
        probs /= probs.sum()
        ordered, order = probs.sort(descending=True)
        keep = ordered.cumsum(0) - ordered < top_p  # the tokens needed to reach top_p, the first always
        probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
    cumulative = probs.cumsum(0)
    total = float(cumulative[-1])
    if not math.isfinite(total) or total <= 0:
        return int(logits.argmax())
    point = torch.rand(1, generator=generator, dtype=torch.float64) * total
    # the first token whose cumulative mass exceeds the point: never one of probability 0
    return min(int(torch.searchsorted(cumulative, point, right=True)), probs.numel() - 1)


@contextlib.contextmanager
def adapter_in_model_dtype(model: Any) -> Iterator[None]:
    """While generating, every trainable adapter weight in the dtype of the weights it adapts (LoRA matrices are
    kept in fp32 for training): no per-step dtype copies. The weights are restored exactly afterwards."""
    dtype = next((p.dtype for p in model.parameters() if not p.requires_grad), None)
    kept: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    if dtype is not None and dtype != torch.float32:
        for parameter in model.parameters():
            if parameter.dtype == torch.float32 and parameter.dtype != dtype:
                kept.append((parameter, parameter.data))
                parameter.data = parameter.data.to(dtype)
    try:
        yield
    finally:
        for parameter, data in kept:
            parameter.data = data


# The row count oneDNN lays packed weights out for. Measured on Gemma 3 270M's shapes (bench/generation_speed.py's
# machine): a layout for 8 rows reads the 262k-row output layer ~1.5x faster than one for 1 row, at 1 row as at 8.
PACK_ROWS = 8


def packing_pays(model: Any) -> bool:
    """Whether this model's linear layers run faster with oneDNN-packed weights: on a CPU, in bf16 or fp16,
    where this torch build has oneDNN kernels for that dtype."""
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    mkldnn = torch.ops.mkldnn
    if parameter.dtype == torch.bfloat16:
        return bool(mkldnn._is_mkldnn_bf16_supported())
    return parameter.dtype == torch.float16 and bool(mkldnn._is_mkldnn_fp16_supported())


VIEWS: dict[int, tuple[bool, bool]] = {}  # id of a model in a generation_view -> that view's (merge, pack)


@contextlib.contextmanager
def generation_view(model: Any, merge: bool = True, pack: bool | None = None) -> Iterator[Any]:
    """The model as it generates fastest, for the duration of the block; exactly the trained model afterwards.

    - Adapter weights in the model's dtype (adapter_in_model_dtype).
    - `pack` (default: where packing_pays): every linear layer's weight laid out once for the fastest product
      (PackedWeight: tunesmith's bf16 kernel on CPUs with AVX512-BF16, else oneDNN's blocked layout); a decode
      step then reads its weights at close to the memory's speed. oneDNN's packed product gives oneDNN's numbers;
      the kernel's sums run in another order, so its logits can differ from oneDNN's by bf16 rounding.
    - RMSNorm layers of the families below in one fused op (torch.rms_norm, in float32 as theirs) instead of
      eight: the same formula, a tenth of the calls.
    - `merge`: a LoRA layer whose one active adapter is on computes with W + scale * B @ A (in float32, rounded
      once to the model's dtype) instead of the three products, where one adapter serves. With the adapter off
      (`disable_adapter()`, the base model's answers) or per-row adapters (`adapter_names`), the layer computes as
      PEFT does, over its packed base weight. A merged answer can differ from the unmerged one by bf16 rounding.

    Packed and merged weights are made on first use and dropped when the block ends. A view entered again inside
    one of the same model (compare's contestants, each generating in its own call) is that view: the weights are
    packed once for all of them."""
    pack = packing_pays(model) if pack is None else pack
    if _sharded(model):  # FSDP's shards are whole only inside each layer's forward: generate as trained
        pack = merge = False
    inside = VIEWS.get(id(model))
    if inside is not None:
        if inside != (merge, pack):
            raise RuntimeError(
                f"generation_view(merge={merge}, pack={pack}) inside one with {inside} of the same model"
            )
        yield model
        return
    patched: list[torch.nn.Module] = []
    with adapter_in_model_dtype(model):
        VIEWS[id(model)] = (merge, pack)
        try:
            for module in model.modules():
                norm = _fused_norm(module)
                if norm is not None:
                    _patch(module, norm, patched)
                elif merge and _mergeable_lora(module):
                    _patch(module, _merged_forward(module, pack), patched)
                elif pack and isinstance(module, torch.nn.Linear):
                    _patch(module, _packed_forward(module), patched)
            yield model
        finally:
            del VIEWS[id(model)]
            for module in patched:
                del module.forward  # the class's own forward again


def _fused_norm(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    known = norm_scale(module)
    if known is None:
        return None
    scale, eps, weight_after = known
    weight: torch.Tensor = module.weight  # type: ignore[assignment]  # norm_scale found it a 1-d tensor
    own, shape = module.forward, (weight.shape[0],)
    # bf16 rows through tunesmith's kernel: one call instead of torch.rms_norm's eight ops and two casts
    native = kernels.takes(weight)
    if not weight_after:

        def gemma(x: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled():
                return own(x)
            if native and x.dtype == torch.bfloat16:
                return kernels.rms_norm(x, scale, eps, weight_after=False)
            return torch.rms_norm(x.float(), shape, scale, eps).type_as(x)

        return gemma

    def llama(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return own(x)
        if native and x.dtype == torch.bfloat16:
            return kernels.rms_norm(x, scale, eps, weight_after=True)
        return weight * torch.rms_norm(x.float(), shape, None, eps).to(x.dtype)

    return llama


def _sharded(model: Any) -> bool:
    return any(type(parameter).__name__ == "DTensor" for parameter in model.parameters())


def _patch(module: torch.nn.Module, forward: Callable[..., torch.Tensor], patched: list[torch.nn.Module]) -> None:
    module.forward = forward  # type: ignore[method-assign]
    patched.append(module)


def _mergeable_lora(module: torch.nn.Module) -> bool:
    """A PEFT LoRA linear layer (not DoRA, not already merged) over a plain nn.Linear."""
    return (
        hasattr(module, "lora_A")
        and hasattr(module, "base_layer")
        and isinstance(module.base_layer, torch.nn.Linear)
        and not getattr(module, "merged", False)
        and not any(getattr(module, "use_dora", {}).values())
    )


class PackedWeight:
    """A linear layer's weight laid out once for the fastest product this machine has for it: tunesmith's bf16
    kernel (tunesmith.kernels, where it pays) or else oneDNN's blocked layout, as torch.compile's CPU freezing
    makes. Either reads the weights at close to the memory's speed, where a plain bf16 product reads them at half."""

    def __init__(self, weight: torch.Tensor) -> None:
        weight = weight.detach()
        self.out_features = weight.shape[0]
        self.native = kernels.takes(weight)
        if self.native:
            self.data = kernels.pack(weight)
        else:
            self.data = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.native:
            return kernels.linear(x, self.data, self.out_features, bias)
        flat = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.data, bias, "none", [], "")
        return flat.reshape(*x.shape[:-1], flat.shape[-1])


def _packed_forward(module: torch.nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    own = module.forward
    held: list[PackedWeight] = []

    def packed() -> PackedWeight:
        if not held:
            held.append(PackedWeight(module.weight))
        return held[0]

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != module.weight.dtype or torch.is_grad_enabled():
            return own(x)
        return packed()(x, module.bias)

    screens: list[kernels.Screen] = []

    def screen() -> kernels.Screen | None:
        """The weight's int8 screen for greedy picks (Decoder.greedy), made on first use; None where the kernel
        does not compute with this weight."""
        if not kernels.takes(module.weight):
            return None
        if not screens:
            screens.append(kernels.screen(module.weight))
        return screens[0]

    # Decoder's native decode: the weight as it computes (a quantized one is not packed: it keeps its own forward)
    forward.packed = lambda: (packed(), module.bias) if module.weight.is_floating_point() else None  # type: ignore[attr-defined]
    forward.screen = screen  # type: ignore[attr-defined]
    return forward


def _merged_forward(module: Any, pack: bool) -> Callable[..., torch.Tensor]:
    own = module.forward
    merged: dict[str, Any] = {}  # adapter name -> its merged weight (a PackedWeight when packing)

    def single() -> str | None:
        """The one adapter this layer computes with now (merged), or None where PEFT's own forward must run."""
        active = list(module.active_adapters)
        if module.disable_adapters or len(active) != 1 or active[0] not in module.lora_A:
            return None
        if active[0] not in merged:
            merged[active[0]] = _merge(module, active[0], pack)
        return active[0]

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        plain = kwargs.get("adapter_names") is None and not torch.is_grad_enabled()
        name = single() if plain and x.dtype == module.base_layer.weight.dtype else None
        if name is None:
            return own(x, *args, **kwargs)
        weight, bias = merged[name], module.base_layer.bias
        return weight(x, bias) if pack else torch.nn.functional.linear(x, weight, bias)

    def packed() -> tuple[PackedWeight, torch.Tensor | None] | None:
        """The packed weight this layer computes with now (its base's where the adapters are off)."""
        if module.disable_adapters:
            base = getattr(vars(module.base_layer).get("forward"), "packed", None)
            return base() if base else None
        name = single() if pack and module.base_layer.weight.is_floating_point() else None
        return (merged[name], module.base_layer.bias) if name is not None else None

    forward.packed = packed  # type: ignore[attr-defined]  # Decoder's native decode
    return forward


def _merge(module: Any, name: str, pack: bool) -> torch.Tensor | PackedWeight:
    base = module.base_layer.weight.detach()
    delta = module.lora_B[name].weight.float() @ module.lora_A[name].weight.float()
    if getattr(module, "fan_in_fan_out", False):
        delta = delta.T
    weight = (base.float() + module.scaling[name] * delta).to(base.dtype)
    return PackedWeight(weight) if pack else weight
