"""Kill a real training run with SIGKILL while it writes a checkpoint, resume it, and compare it with an
uninterrupted run of the same config: final weights and the loss curve after the resume point.

    python bench/resume_check.py                                   # the quickstart model, 6 steps
    python bench/resume_check.py --config my.yaml --steps 20 --kill-at 10

Every run is a separate `tunesmith train` process, as a user would run it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def train(config: str, out: Path, steps: int, every: int, *extra: str, env: dict | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "tunesmith", "train", config, "--out", str(out), "--quiet"]
    command += ["--max-steps", str(steps), "--checkpoint.every", str(every), "--checkpoint.keep_last", "10", *extra]
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=os.environ | (env or {}), cwd=ROOT)


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("type") == "train"}


def weights(run: Path) -> dict:
    found = next(run / d / f for d in ("adapter", "model") for f in os.listdir(run / d) if f.endswith(".safetensors"))
    return load_file(str(found))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/quickstart/config.yaml", help="Run config [default: quickstart].")
    parser.add_argument("--steps", type=int, default=6, help="Optimizer steps per run [default: 6].")
    parser.add_argument("--every", type=int, default=2, help="Checkpoint every N steps [default: 2].")
    parser.add_argument("--kill-at", type=int, default=4, help="SIGKILL while writing this step's checkpoint.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        reference, killed = Path(tmp) / "reference", Path(tmp) / "killed"
        start = time.perf_counter()
        done = train(args.config, reference, args.steps, args.every)
        _, err = done.communicate()
        if done.returncode:
            sys.exit(f"reference run failed:\n{err[-3000:]}")
        print(f"reference run: {time.perf_counter() - start:.0f}s")

        victim = train(
            args.config, killed, args.steps, args.every, env={"TUNESMITH_CHECKPOINT_PAUSE": f"{args.kill_at}:600"}
        )
        for line in victim.stderr:
            if "checkpoint-writing" in line:
                break
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        left = sorted(p.name for p in (killed / "checkpoints").iterdir())
        print(f"SIGKILL while writing step {args.kill_at}'s checkpoint; checkpoints left: {left}")

        start = time.perf_counter()
        resumed = train(args.config, killed, args.steps, args.every, "--resume")
        _, err = resumed.communicate()
        if resumed.returncode:
            sys.exit(f"resumed run failed:\n{err[-3000:]}")
        print(f"resumed run: {time.perf_counter() - start:.0f}s")

        ref_losses, new_losses = losses(reference), losses(killed)
        print(f"{'step':>5} {'uninterrupted':>14} {'killed+resumed':>15} {'diff':>10}")
        for step, loss in ref_losses.items():
            print(f"{step:5} {loss:14.6f} {new_losses.get(step, float('nan')):15.6f} {new_losses[step] - loss:+10.2e}")
        ref_w, new_w = weights(reference), weights(killed)
        worst = max(float((new_w[k] - v).abs().max()) for k, v in ref_w.items())
        scale = max(float(v.abs().max()) for v in ref_w.values())
        print(f"final weights: {len(ref_w)} tensors, max |diff| {worst:.3e} (largest |weight| {scale:.3e})")
        print(
            "RESULT " + json.dumps({"max_abs_weight_diff": worst, "same_steps": ref_losses.keys() == new_losses.keys()})
        )


if __name__ == "__main__":
    main()
