"""KTO's KL reference point is the mean over the whole micro-batch, whatever the number of processes, and a
micro-batch too small to estimate it from is warned about once."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tunesmith.cli import main
from tunesmith.objectives import OBJECTIVES
from tunesmith.objectives.losses import kto_kl
from tunesmith.objectives.preference import kto_batch_warning, sum_over_processes

from .conftest import write_jsonl
from .test_cli import train_args
from .test_preference import kto_records

# Per process: policy and reference log-probs of its mismatched pairs (gaps 1; 3 and 5: a mean of 3 over all three).
SHARES = [([-4.0], [-5.0]), ([-2.0, -1.0], [-5.0, -6.0])]


def test_the_reference_point_is_the_mean_over_every_processs_pairs():
    first = SHARES[0]
    alone = kto_kl(torch.tensor(first[0]), torch.tensor(first[1]))
    assert alone.item() == pytest.approx(1.0)  # one process's share of the micro-batch: one sample

    def other_process_too(totals):  # what all_reduce adds: the other process's sum of gaps and its count
        return totals + torch.tensor([8.0, 2.0])

    together = kto_kl(torch.tensor(first[0]), torch.tensor(first[1]), other_process_too)
    assert together.item() == pytest.approx(3.0) and not together.requires_grad
    assert kto_kl(torch.tensor([-9.0]), torch.tensor([-5.0]), other_process_too).item() == pytest.approx(4 / 3)


def test_in_one_process_the_sum_over_processes_is_the_tensor_itself():
    totals = torch.tensor([2.5, 4.0])
    assert torch.equal(sum_over_processes(totals), totals)


def _kl_on(rank: int, size: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    try:
        policy, reference = SHARES[rank]
        kl = kto_kl(torch.tensor(policy), torch.tensor(reference), sum_over_processes)
        with open(f"{out}.{rank}", "w") as handle:
            json.dump(kl.item(), handle)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_share_one_reference_point(tmp_path):
    out = tmp_path / "kl"
    mp.spawn(_kl_on, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    values = [json.loads((tmp_path / f"kl.{rank}").read_text()) for rank in range(2)]
    assert values == pytest.approx([3.0, 3.0])


def test_a_micro_batch_under_two_per_process_is_warned_about():
    kto = OBJECTIVES["kto"]
    one = kto_batch_warning(kto, 1, 1)
    assert one and "1 per process" in one and "train.batch_size to 2 or more" in one
    split = kto_batch_warning(kto, 3, 2)
    assert split and "3 over all 2 processes" in split and "train.batch_size to 4" in split
    assert kto_batch_warning(kto, 2, 1) is None and kto_batch_warning(kto, 4, 2) is None
    assert kto_batch_warning(OBJECTIVES["dpo"], 1, 1) is None


def test_a_kto_run_at_batch_size_1_warns_once(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "kto.jsonl", kto_records(20))
    flags = ["--objective", "kto", "--max-steps", "2", "--train.batch_size", "1", "--test-fraction", "0.2"]
    assert main(train_args(tiny_model_dir, data, tmp_path / "run", *flags, "--quiet")) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("KTO estimates its KL reference point") == 1 and "1 per process" in err
