"""Check tunesmith's GGUF writer against the reference GGUF of the quickstart model.

    python bench/gguf_check.py [--type f16|q8_0]

The embedded Gemma 3 270M ships as a Q4_K_M GGUF made by llama.cpp; tunesmith loads it through
transformers (which undoes llama.cpp's layout conventions). Writing that loaded model back with
tunesmith's GGUF writer must give llama.cpp's tensor names, shapes and layout: every tensor is compared
with the reference file's dequantized tensor, and the metadata keys the reference carries are compared.
Where llama-cpp-python is installed, the written file is also loaded by llama.cpp and asked to generate.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--type", default="f16", choices=["f16", "q8_0", "f32"], help="GGUF tensor type to write")
    args = parser.parse_args()

    import gguf
    from gguf.quants import dequantize

    from tunesmith.deploy.gguf_writer import write_gguf
    from tunesmith.models import load_model, load_tokenizer, resolve_model_path, source_gguf

    reference = source_gguf("gemma-3-270m")
    source = resolve_model_path("gemma-3-270m")
    model, tokenizer = load_model(source), load_tokenizer(source)
    out = Path(tempfile.mkdtemp()) / f"gemma-3-270m-{args.type}.gguf"
    started = time.perf_counter()
    write_gguf(model, tokenizer, "{{ messages[0]['content'] }}", None, out, kind=args.type, source_gguf=reference)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - started:.1f} s")

    ours, theirs = gguf.GGUFReader(out), gguf.GGUFReader(reference)
    ours_t = {t.name: t for t in ours.tensors}
    theirs_t = {t.name: t for t in theirs.tensors}
    print(f"tensors: ours {len(ours_t)}, reference {len(theirs_t)}, same names: {set(ours_t) == set(theirs_t)}")
    worst_name, worst = "", 0.0
    for name, ref in theirs_t.items():
        a = dequantize(ours_t[name].data, ours_t[name].tensor_type).astype(np.float32)
        b = dequantize(ref.data, ref.tensor_type).astype(np.float32)
        if a.shape != b.shape:
            print(f"SHAPE MISMATCH {name}: {a.shape} vs {b.shape}")
            continue
        rel = float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))
        if rel > worst:
            worst_name, worst = name, rel
    print(f"largest difference relative to the tensor's max |value|: {worst:.2e} ({worst_name})")
    keys = [k for k in theirs.fields if k.startswith(("gemma3.", "tokenizer.ggml."))]
    differing = [k for k in keys if k not in ours.fields or _value(ours.fields[k]) != _value(theirs.fields[k])]
    print(f"metadata: {len(keys)} architecture/tokenizer keys in the reference, differing or missing: {differing}")

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python not installed: generation check skipped")
        return
    from tunesmith.deploy.llamacpp import load_llama

    llm = load_llama(Path(out), 256)
    text = llm("The capital of France is", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    print(f"llama.cpp generates from it: {text!r}")


def _value(field):
    value = field.contents()
    return [round(v, 4) for v in value] if isinstance(value, list) and value and isinstance(value[0], float) else value


if __name__ == "__main__":
    main()
