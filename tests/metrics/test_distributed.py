"""Two gloo processes: all-reduced counts give the Dice of the concatenated data, unlike averaging per-rank Dice."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distseg.metrics import MetricAccumulator, confusion_counts, dice_from_counts

WORLD = 2


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """Deliberately unbalanced shards: rank 0's samples hold large lesions, rank 1's small ones."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(8, 2, 12, 12, generator=g)
    targets = torch.zeros(8, 2, 12, 12)
    targets[:4, :, 1:11, 1:11] = 1.0
    targets[4:, :, 5:7, 5:7] = 1.0
    logits = logits + 2.0 * (2 * targets - 1) * (torch.rand(8, 2, 12, 12, generator=g) < 0.7)
    return logits, targets


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        logits, targets = _data()
        shard = slice(rank * 4, (rank + 1) * 4)
        acc = MetricAccumulator(["WT", "ET"])
        for i in range(shard.start, shard.stop, 2):  # two batches per rank
            acc.update(confusion_counts(logits[i:i + 2], targets[i:i + 2]))
        local = dice_from_counts(confusion_counts(logits[shard], targets[shard]))  # this rank's own Dice
        result = acc.compute()
        torch.save({"global": acc.counts(), "local_dice": local, "result": result}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_allreduced_counts_equal_concatenated_data(tmp_path, free_port: int) -> None:
    mp.spawn(_worker, args=(free_port, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    logits, targets = _data()
    whole = confusion_counts(logits, targets)
    true_dice = dice_from_counts(whole)
    for r in ranks:
        assert torch.equal(r["global"], whole)
        assert r["result"]["dice/WT"] == pytest.approx(true_dice[0].item(), rel=1e-12)
        assert r["result"]["dice/ET"] == pytest.approx(true_dice[1].item(), rel=1e-12)
    averaged = (ranks[0]["local_dice"] + ranks[1]["local_dice"]) / 2
    # The unbalanced shards make the mean of per-rank Dice a different (wrong) number.
    assert (averaged - true_dice).abs().min() > 0.05, (averaged, true_dice)
