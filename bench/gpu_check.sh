#!/usr/bin/env bash
# The GPU check, one command for a lent machine (about 3-4 minutes on an H200). Prepare here, once:
#     bash bench/gpu_wheels.sh            # wheels the GPU image lacks -> .whl/ (about 50 MiB with bitsandbytes)
# then run through the device tool:  command "bash bench/gpu_check.sh", carry [".whl"], timeout_s 420.
# Prints: the GPU-only tests, LoRA on a ~1.1B Llama (bf16, SDPA, packing, compile: tokens/s, MFU, peak memory
# next to plan's estimate), the generation engine's tokens/s (bench/gpu_generate.py), a few steps in fp16 with loss scaling, and a few requests to a served run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD:/tmp/site" TUNESMITH_CACHE=/tmp/tunesmith-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed (run bench/gpu_wheels.sh here first and carry .whl)"; exit 2; }
status=0
step() { echo; echo "=== $1 ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, scipy; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'scipy', scipy.__version__, \
'bf16', torch.cuda.is_bf16_supported())"

step "GPU-only tests (pytest -m gpu)"
timeout 150 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -x 2>&1 | tail -15 || status=1

step "LoRA on a 1.1B Llama: bf16, SDPA, packing, compile"
timeout 150 python3 bench/gpu_train.py --size 1b --steps 20 --json "$OUT/gpu_train_1b.json" 2>&1 | grep -v "^step " \
  || status=1

step "the generation engine on CUDA: tokens/s at batch 1 and 8 beside transformers' generate"
timeout 90 python3 bench/gpu_generate.py --size 1b 2>&1 | grep -v Warning || status=1

step "fp16 with loss scaling (a few steps, no compile)"
timeout 60 python3 - <<'PY' || status=1
import torch
from tests.conftest import build_model, build_tokenizer, chat_records, write_jsonl
from pathlib import Path
from tunesmith.config import RunConfig
from tunesmith.methods import apply_method, load_base, training_dtype
from tunesmith.train.loop import fit
from tunesmith.train.precision import resolve
from tests.test_train import examples_for

root = Path("/tmp/fp16"); root.mkdir(exist_ok=True)
tok = build_tokenizer(); build_model(len(tok)).save_pretrained(root / "m"); tok.save_pretrained(root / "m")
config = RunConfig.model_validate({"method": "lora", "train": {"dtype": "fp16", "max_steps": 10, "batch_size": 8, "lr": 2e-2}})
chosen = resolve("fp16", device="cuda")
model, _ = apply_method(load_base(config, str(root / "m"), training_dtype(config, chosen.dtype)), config)
result = fit(model, examples_for(write_jsonl(root / "d.jsonl", chat_records(40)), tok), config.train, tok.pad_token_id, precision=chosen)
print("fp16 loss", result.history[0]["loss"], "->", result.history[-1]["loss"], "skipped", result.skipped_steps)
PY

step "train a tiny run with the CLI on the GPU, serve it, send requests"
timeout 120 python3 - <<'PY' || status=1
import json, subprocess, sys, time, urllib.request
from pathlib import Path
from tests.conftest import build_model, build_tokenizer, chat_records, write_jsonl
from tunesmith.data.tokenize import DEFAULT_CHAT_TEMPLATE

root = Path("/tmp/serve-check"); root.mkdir(exist_ok=True)
tok = build_tokenizer(DEFAULT_CHAT_TEMPLATE); build_model(len(tok)).save_pretrained(root / "m"); tok.save_pretrained(root / "m")
data = write_jsonl(root / "d.jsonl", chat_records(40))
train = [sys.executable, "-m", "tunesmith", "train", "--model", str(root / "m"), "--data", str(data), "--out", str(root / "run"),
         "--max-steps", "6", "--allow-warnings", "true", "--quiet", "--overwrite"]
done = subprocess.run(train, capture_output=True, text=True)
print("train exit", done.returncode, done.stderr[-600:])
print("manifest precision", json.loads((root / "run" / "manifest.json").read_text()).get("precision"))
server = subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", str(root / "run"), "--port", "8765", "--quiet"])
try:
    for _ in range(120):
        try:
            urllib.request.urlopen("http://127.0.0.1:8765/health", timeout=1); break
        except OSError:
            time.sleep(0.5)
    for i in range(3):
        body = json.dumps({"model": "run", "messages": [{"role": "user", "content": f"colour red item {i}"}], "max_tokens": 8}).encode()
        request = urllib.request.Request("http://127.0.0.1:8765/v1/chat/completions", body, {"Content-Type": "application/json"})
        start = time.perf_counter()
        answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
        print("request", i, "->", repr(answer["choices"][0]["message"]["content"]), f"{time.perf_counter() - start:.2f}s")
finally:
    server.terminate()
PY

step "done: status $status (0 = every step ran)"
exit $status
