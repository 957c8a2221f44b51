"""Data-parallel training on PyTorch's distributed engine, set up through accelerate.

`tunesmith train CONFIG --nproc N` relaunches the same command as N worker processes: through
`accelerate launch` on GPUs (so accelerate's FSDP and DeepSpeed plugins apply) and through
`torch.distributed.run` on CPU (gloo), which is what accelerate itself uses for GPUs and the only
multi-process CPU path it has besides MPI. Workers started by hand with `accelerate launch -m
tunesmith.cli train ...` or `torchrun -m tunesmith.cli train ...` (one or many nodes) behave the same.

Batches do not depend on the number of processes: `train.batch_size` examples form one micro-batch
of the seeded stream, and each process takes every world-th example of it (a partition, so no
example is seen twice per epoch). The loss is normalised by the answer tokens of the whole step on
every process, so N processes compute the same update as one process with the same config, checkpoints
hold the full (replicated) state, and a run checkpointed by N processes resumes on M.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tunesmith.errors import TunesmithError

STRATEGIES = ("ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True inside a worker started by torchrun / accelerate launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup() -> World:
    """Join the process group when launched as one of several workers (gloo on CPU, NCCL on GPUs)."""
    if not launched():
        return World()
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return World(state.process_index, state.num_processes)


def barrier(world: World) -> None:
    if world.size > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


@contextmanager
def main_first(world: World):
    """Run the block on the main process first (it writes), then on the others (they read)."""
    if world.size > 1 and not world.main:
        barrier(world)
    yield
    if world.size > 1 and world.main:
        barrier(world)


def shard(indices: list[int], world: World) -> list[int]:
    """This process's share of a micro-batch: every size-th example, starting at its rank."""
    return indices[world.rank :: world.size]


def strip_option(argv: list[str], name: str) -> list[str]:
    """argv without `--name VALUE` / `--name=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def launch_command(
    argv: list[str], nproc: int, strategy: str = "ddp", port: int | None = None
) -> tuple[list[str], dict]:
    """The worker launch for `tunesmith <argv>` on `nproc` processes of this machine, and its extra env."""
    import torch

    worker = ["-m", "tunesmith.cli", *strip_option(strip_option(argv, "--nproc"), "--strategy")]
    env = {"TUNESMITH_STRATEGY": strategy, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")}
    if not torch.cuda.is_available():
        if strategy != "ddp":
            raise TunesmithError(
                f"--strategy {strategy} shards the model across GPUs; on CPU only ddp runs (gloo). Drop --strategy."
            )
        threads = max(1, (os.cpu_count() or nproc) // nproc)
        env |= {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(threads)}
        rendezvous = ["--standalone"] if port is None else ["--master-port", str(port)]
        command = [sys.executable, "-m", "torch.distributed.run", *rendezvous, "--nproc-per-node", str(nproc)]
        return [*command, *worker], env
    if strategy.startswith("deepspeed"):
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise TunesmithError(f"--strategy {strategy} needs DeepSpeed: pip install deepspeed.") from None
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc), "--num_machines", "1"]
    if port is not None:
        command += ["--main_process_port", str(port)]
    command += {
        "ddp": ["--multi_gpu"],
        "fsdp": [
            "--use_fsdp",
            "--fsdp_version",
            "2",
            "--fsdp_auto_wrap_policy",
            "TRANSFORMER_BASED_WRAP",
            "--fsdp_state_dict_type",
            "FULL_STATE_DICT",
        ],
        "deepspeed-zero2": ["--use_deepspeed", "--zero_stage", "2"],
        "deepspeed-zero3": ["--use_deepspeed", "--zero_stage", "3", "--zero3_save_16bit_model", "true"],
    }[strategy]
    return [*command, *worker], {k: v for k, v in env.items() if v}


def reduce_sum(value: float, world: World, device: Any) -> float:
    if world.size == 1:
        return value
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def reduce_max(value: int, world: World, device: Any) -> int:
    if world.size == 1:
        return value
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())
