"""Generation speed: the engine (tunesmith.generation) beside today's HF `generate` path and the hardware's bounds.

    python bench/generation_speed.py [--prompts 16] [--max-new-tokens 96] [--run RUN | --model NAME] [--gguf FILE]

The model is Gemma 3 270M (the embedded default; --model smollm2-135m for the Llama family) in bf16 with a rank-16
all-linear LoRA, as the quickstart trains it (a random adapter unless --run names a finished LoRA run); prompts are
quickstart notes in the model's chat template; greedy; each answer ends at the end of its turn or the token limit.
Printed: the memory-bandwidth bound (the faster of a 1 GiB float32 sum and a 1 GiB stream through tunesmith's
kernel) and bf16 matmul peak measured here, tokens/s of each path at batch 1 and 8 (the engine's with and without
the packing of the weights before, which llama.cpp's load matches; and with every logit computed, the output layer's
greedy screen off), how many answers the engine and the HF path agree on, and llama.cpp's tokens/s on --gguf FILE
when given. Where the kernel runs, the batch-1 bound is over what a greedy step reads: the output layer's int8 screen
(kernels.greedy) in place of its bf16 weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from tunesmith import kernels
from tunesmith.config import build_config
from tunesmith.data.formats import Message
from tunesmith.data.tokenize import prompt_ids, use_chat_template
from tunesmith.evaluate.baselines import cut_at_stops
from tunesmith.generation import Engine, Request, generation_view
from tunesmith.methods import apply_method, load_base
from tunesmith.models import load_tokenizer, resolve_model_path

ROOT = Path(__file__).resolve().parent.parent


@torch.inference_mode()
def hf_generate(model: Any, tokenizer: Any, prompts: list[tuple[Message, ...]], max_new_tokens: int,
                batch_size: int, stops: list[str]) -> list[str]:  # fmt: skip
    """transformers' generate in left-padded batches with a dynamic cache: how tunesmith generated before the
    engine (evaluate/generate.py until this engine replaced it), kept here as the path to beat."""
    sampling: dict[str, Any] = {"do_sample": False}
    special = set(tokenizer.all_special_tokens)
    texts = [stop for stop in stops or [] if stop not in special]
    # A stop that is one special token (an end-of-turn such as Gemma's) ends generation as an EOS id.
    eos = [tokenizer.eos_token_id, *(tokenizer.convert_tokens_to_ids(stop) for stop in stops or [] if stop in special)]
    if texts:
        sampling |= {"stop_strings": texts, "tokenizer": tokenizer}
    encoded = [prompt_ids(tokenizer, messages) for messages in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    pad = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, index in enumerate(chunk):
            ids = encoded[index]
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        output = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention.to(model.device),
            max_new_tokens=max_new_tokens,
            **sampling,
            pad_token_id=pad,
            eos_token_id=sorted({token for token in eos if token is not None}) or None,
        )
        for row, index in enumerate(chunk):
            answers[index] = cut_at_stops(tokenizer.decode(output[row, width:], skip_special_tokens=True), texts)
    return answers


def turn_stop_known(tokenizer) -> bool:
    return "<end_of_turn>" in tokenizer.get_vocab()


def bandwidth_gbs() -> float:
    """The fastest read of 1 GiB measured here: a float32 sum (a bf16 sum converts as it reads, slower), or, where
    tunesmith's kernel runs, a stream through it (a 1 GiB bf16 weight on 2 MiB pages times a zero row), whichever
    is faster. The kernel's read is the faster one on AMD EPYC, so a bound from the sum alone would be too low."""
    data = torch.ones(256 * 2**20, dtype=torch.float32)
    data.sum()
    best = min(_timed(lambda: data.sum()) for _ in range(5))
    rate = data.numel() * 4 / best / 1e9
    if kernels.pays() and kernels.available():
        data = torch.empty(0)
        packed = kernels.pack(torch.randn(2**19, 1024).bfloat16())  # values as a real weight has
        row = torch.randn(1, 1024).bfloat16()
        kernels.linear(row, packed, 2**19, None)
        best = min(_timed(lambda: kernels.linear(row, packed, 2**19, None)) for _ in range(5))
        rate = max(rate, packed.numel() * 2 / best / 1e9)
    return rate


def matmul_gflops() -> float:
    a, b = torch.randn(2048, 2048, dtype=torch.bfloat16), torch.randn(2048, 2048, dtype=torch.bfloat16)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return 2 * 2048**3 / best / 1e9


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def model_and_tokenizer(run: str | None, name: str = "gemma-3-270m"):
    if run:
        from tunesmith.evaluate.generate import load_run

        loaded = load_run(run)
        return loaded.model, loaded.tokenizer
    config = build_config({"model": name, "method": "lora", "lora": {"r": 16, "alpha": 32}})
    source = resolve_model_path(config.model)
    tokenizer = load_tokenizer(source)
    use_chat_template(tokenizer, None)
    model, _ = apply_method(load_base(config, source, torch.bfloat16), config)
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # a tuned adapter changes the answers; a fresh one is zero
            parameter.data.normal_(0, 0.02)
    return model.eval(), tokenizer


def prompts(count: int, run: str | None = None) -> list[tuple[Message, ...]]:
    """The run's first test items (as compare sees them), or else the quickstart's last notes."""
    source = Path(run) / "data" / "test.jsonl" if run else ROOT / "examples/quickstart/notes.jsonl"
    lines = source.read_text().splitlines()
    lines = lines[:count] if run else lines[-count:]
    return [tuple(Message(m["role"], m["content"]) for m in json.loads(line)["messages"][:-1]) for line in lines]


def engine_answers(model, tokenizer, encoded, max_new_tokens, rows, merge=True) -> tuple[list[list[int]], float, float]:
    """The engine's greedy answers, the seconds they took, and the seconds the view took to pack and merge the
    weights before (timed apart, as llama.cpp's load is: a server or a compare pays it once)."""
    turn_end = tokenizer.convert_tokens_to_ids("<end_of_turn>") if "<end_of_turn>" in tokenizer.get_vocab() else None
    stops = frozenset(t for t in (tokenizer.eos_token_id, turn_end) if t is not None)
    start = time.perf_counter()
    with generation_view(model, merge=merge):
        engine = Engine(model, max_rows=rows, max_length=max(map(len, encoded)) + max_new_tokens + 1)
        engine.run([Request(encoded[0][:4], 1)])  # packs and merges every weight the answers use
        packing = time.perf_counter() - start
        start = time.perf_counter()
        requests = [Request(ids, max_new_tokens, stop_ids=stops) for ids in encoded]
        engine.run(requests)
    return [r.tokens for r in requests], time.perf_counter() - start, packing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--run", help="A finished LoRA run to generate with instead of a random adapter.")
    parser.add_argument("--model", default="gemma-3-270m", help="Embedded model with a random adapter (no --run).")
    parser.add_argument("--gguf", help="A GGUF export of the same weights, for llama.cpp's tokens/s.")
    parser.add_argument("--skip-hf", action="store_true", help="Leave out today's HF generate path (slow).")
    parser.add_argument("--batches", default="1,8", help="Batch sizes to time, comma-separated [default: 1,8].")
    args = parser.parse_args()
    flags = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "avx2") if f in Path("/proc/cpuinfo").read_text()]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"flags {' '.join(flags)}, torch {torch.__version__}")  # fmt: skip
    bound = bandwidth_gbs()
    print(f"memory bandwidth {bound:.1f} GB/s, bf16 matmul {matmul_gflops():.0f} GFLOP/s")
    model, tokenizer = model_and_tokenizer(args.run, args.model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"weights {weights / 1e9:.3f} GB -> batch-1 bound {bound * 1e9 / weights:.0f} tokens/s")
    head = model.get_output_embeddings().weight
    screened = kernels.pays() and kernels.available() and head.dtype == torch.bfloat16
    if screened:  # a greedy step reads the output layer's int8 screen (1 byte a weight, 16 a row) instead
        weights += head.shape[0] * (head.shape[1] + 16) - head.numel() * head.element_size()
        print(f"a greedy step reads {weights / 1e9:.3f} GB (the output layer's int8 screen instead of its bf16 "
              f"weights) -> batch-1 bound {bound * 1e9 / weights:.0f} tokens/s")  # fmt: skip
    conversations = prompts(args.prompts, args.run)
    encoded = [prompt_ids(tokenizer, c) for c in conversations]
    results = {}
    batches = [int(b) for b in args.batches.split(",")]
    for rows in batches:
        tokens, seconds, packing = engine_answers(model, tokenizer, encoded, args.max_new_tokens, rows)
        produced = sum(map(len, tokens))
        results[rows] = tokens
        rate = produced / seconds
        share = f" = {rate / (bound * 1e9 / weights):.0%} of the bound" if rows == 1 else ""
        print(f"engine   batch {rows}: {rate:6.1f} tokens/s ({produced} tokens, {seconds:.1f} s){share}; "
              f"with the {packing:.2f} s of packing before: {produced / (seconds + packing):.1f}")  # fmt: skip
    if screened:  # the same engine computing every logit (the screen off), as before the screen
        from tunesmith.decoder import Decoder

        greedy, Decoder.greedy = Decoder.greedy, lambda self, hidden: None  # type: ignore[method-assign]
        for rows in batches:
            tokens, seconds, _ = engine_answers(model, tokenizer, encoded, args.max_new_tokens, rows)
            same = sum(a == b for a, b in zip(tokens, results[rows], strict=True))
            print(f"engine   batch {rows} computing every logit (no screen): {sum(map(len, tokens)) / seconds:6.1f} "
                  f"tokens/s ({same} of {len(tokens)} answers identical to the screened ones)")  # fmt: skip
        Decoder.greedy = greedy  # type: ignore[method-assign]
    if kernels.pays() and kernels.available():  # the same engine on oneDNN's product, as before the kernel
        os.environ["TUNESMITH_KERNELS"] = "0"
        tokens, seconds, _ = engine_answers(model, tokenizer, encoded, args.max_new_tokens, 1)
        del os.environ["TUNESMITH_KERNELS"]
        same = sum(a == b for a, b in zip(tokens, results[batches[0]], strict=True))
        print(f"engine   batch 1 on oneDNN's product: {sum(map(len, tokens)) / seconds:6.1f} tokens/s "
              f"({same} of {len(tokens)} answers identical to the kernel's)")  # fmt: skip
    if not args.skip_hf:
        unmerged, _, _ = engine_answers(model, tokenizer, encoded, args.max_new_tokens, batches[-1], merge=False)
        stops = ["<end_of_turn>"] if turn_stop_known(tokenizer) else []
        for rows in batches:
            start = time.perf_counter()
            texts = hf_generate(model, tokenizer, conversations, args.max_new_tokens, rows, stops=stops)
            seconds = time.perf_counter() - start
            produced = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
            print(f"HF path  batch {rows}: {produced / seconds:6.1f} tokens/s (~{produced} tokens, {seconds:.1f} s)")
        for label, answers in (("merged adapter", results[batches[-1]]), ("unmerged adapter", unmerged)):
            engine_texts = [tokenizer.decode(t, skip_special_tokens=True) for t in answers]
            same = sum(a.strip() == b.strip() for a, b in zip(engine_texts, texts, strict=True))
            print(f"greedy answers identical to the HF path ({label}): {same} of {len(texts)}")
    if args.gguf:
        from tunesmith.deploy.llamacpp import load_llama

        llm = load_llama(Path(args.gguf), 1024)
        produced, start = 0, time.perf_counter()
        for ids in encoded:
            out = llm.create_completion(ids, max_tokens=args.max_new_tokens, temperature=0.0)
            produced += out["usage"]["completion_tokens"]
        seconds = time.perf_counter() - start
        print(f"llama.cpp batch 1: {produced / seconds:6.1f} tokens/s ({produced} tokens, {seconds:.1f} s)")
    print(f"threads {os.environ.get('OMP_NUM_THREADS', torch.get_num_threads())}")


if __name__ == "__main__":
    main()
