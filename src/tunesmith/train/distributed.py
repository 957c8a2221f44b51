"""Data-parallel training on PyTorch's distributed engine, set up through accelerate.

`tunesmith train CONFIG --nproc N` relaunches the same command as N worker processes: through
`accelerate launch` on GPUs (so accelerate's FSDP and DeepSpeed plugins apply) and through
`torch.distributed.run` on CPU (gloo), which is what accelerate itself uses for GPUs and the only
multi-process CPU path it has besides MPI. `--strategy ddp` replicates the model (accelerate's DDP);
`--strategy fsdp` shards it with PyTorch's FSDP2 (`fully_shard`, one group per decoder layer), which
runs on CPU/gloo as well as on GPUs, unlike accelerate's FSDP plugin. Workers started by hand with `accelerate launch -m
tunesmith train ...` or `torchrun -m tunesmith train ...` (one or many nodes) behave the same.

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

STRATEGIES = ("ddp", "fsdp")


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


def launch_command(argv: list[str], nproc: int, port: int | None = None) -> tuple[list[str], dict[str, str]]:
    """The worker launch for `tunesmith <argv>` on `nproc` processes of this machine, and its extra env."""
    import torch

    worker = ["-m", "tunesmith", *strip_option(argv, "--nproc")]
    if torch.cuda.is_available():
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc)]
        command += ["--num_machines", "1"] + (["--main_process_port", str(port)] if port else [])
        return [*command, *worker], {}
    # CPU: gloo, and the cores split between the processes instead of each taking all of them.
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or nproc) // nproc))
    rendezvous = ["--standalone"] if port is None else ["--master-port", str(port)]
    command = [sys.executable, "-m", "torch.distributed.run", *rendezvous, "--nproc-per-node", str(nproc)]
    return [*command, *worker], {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": threads}


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


def fully_shard_model(trainer: Any, layers: Any) -> Any:
    """FSDP2: each decoder layer its own shard group, the rest (embeddings, norm, head) the root one.

    Parameters become DTensors sharded over the processes (gloo on CPU, NCCL on GPUs); frozen and
    trainable weights may share a group, as LoRA needs.
    """
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer)
    return fully_shard(trainer)


def whole(value: Any) -> Any:
    """A tensor as one whole tensor: FSDP's DTensor shards gathered (a collective: call on all processes)."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def shard_like(param: Any, full: Any) -> Any:
    """A whole tensor cut the way `param` is sharded across processes (unchanged for a plain parameter)."""
    if not hasattr(param, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements)


def full_optimizer_state(optimizer: Any) -> dict[str, Any]:
    """The optimizer state in the single-process layout, gathered from shards (a collective under FSDP)."""
    state = optimizer.state_dict()
    gathered = {
        i: {k: whole(v).cpu() if hasattr(v, "cpu") else v for k, v in s.items()} for i, s in state["state"].items()
    }
    return {"state": gathered, "param_groups": state["param_groups"]}


def load_optimizer_state(model: Any, optimizer: Any, optimizer_state: dict[str, Any]) -> None:
    """Load an optimizer state in the single-process layout (from any world size) into a sharded optimizer."""
    params = [p for p in model.parameters() if p.requires_grad]
    state = {
        i: {k: shard_like(params[int(i)], v) if hasattr(v, "dim") and v.dim() > 0 else v for k, v in s.items()}
        for i, s in optimizer_state["state"].items()
    }
    optimizer.load_state_dict({"state": state, "param_groups": optimizer_state["param_groups"]})
