"""Two gloo processes: replicated queues stay identical through wrap-around and merged statistics equal
those of one process that sees every rank's batches; the key gather is one collective that loses nothing."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from fne_dist.queue import GlobalKeys, MomentumQueue
from fne_dist.stats import SimilarityStats

WORLD, B, D, Q, STEPS = 2, 3, 8, 10, 5  # global batch 6 into a queue of 10: wraps at steps 2 and 4


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    feats = [F.normalize(torch.randn(B, D, generator=g), dim=1) for _ in range(4)]  # ia, ta, ik, tk
    ids = torch.arange(B) + 1000 * step + 10 * rank
    return (*feats, ids, ids % 3)


def worker(rank: int, port: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    queue, stats = MomentumQueue(Q, D), SimilarityStats(reset="never")
    for step in range(STEPS):
        ia, ta, ik, tk, ids, labels = batch(step, rank)
        keys = GlobalKeys.gather(ik, tk, ids, labels)
        stats.update(ia, ta, ids)
        queue.enqueue(keys)
    torch.save({"queue": queue.state_dict(), "stats": stats.state_dict()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_keep_identical_queues_and_merge_statistics(tmp_path, port):
    mp.spawn(worker, args=(port, str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    queue, stats = MomentumQueue(Q, D), SimilarityStats(reset="never")
    for step in range(STEPS):
        parts = [batch(step, r) for r in range(WORLD)]
        for ia, ta, _, _, ids, _ in parts:
            stats.update(ia, ta, ids)
        queue.enqueue(GlobalKeys(*(torch.cat([p[k] for p in parts]) for k in (2, 3, 4, 5))))

    for got in ranks:
        for name, want in queue.state_dict().items():
            assert torch.equal(torch.as_tensor(got["queue"][name]), torch.as_tensor(want)), name
        assert torch.allclose(got["stats"]["moments"], stats.state_dict()["moments"], rtol=1e-12)
    assert queue.ptr == (STEPS * WORLD * B) % Q and queue.valid.all()
    assert stats.count_pos > 0 and stats.count_neg > 0


COLLECTIVES = ("all_gather", "all_gather_single", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "all_reduce", "all_to_all_single")


def step_keys(rank: int, dtype: torch.dtype, n: int = 3, dim: int = 5):
    """A rank's keys (odd width, the given dtype), ids beyond what a float holds exactly, labels with -1."""
    g = torch.Generator().manual_seed(rank)
    image, text = (torch.randn(n, dim, generator=g).to(dtype) for _ in range(2))
    ids = torch.arange(n) + 2**62 + 2**40 * rank + 1
    return image, text, ids, torch.tensor([-1, 7, 2**53 + 1])[:n] - rank


def gather_worker(rank: int, port: int, out: str, dtype: torch.dtype):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    calls = []
    for name in COLLECTIVES:
        original = getattr(dist, name)
        setattr(dist, name, lambda *a, _name=name, _original=original, **k: calls.append(_name) or _original(*a, **k))
    keys = GlobalKeys.gather(*step_keys(rank, dtype))
    torch.save({"keys": vars(keys), "calls": calls}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_key_gather_is_one_collective_equal_to_gathering_each_tensor(dtype, tmp_path, port):
    mp.spawn(gather_worker, args=(port, str(tmp_path), dtype), nprocs=WORLD)
    want = [torch.cat(parts) for parts in zip(*(step_keys(r, dtype) for r in range(WORLD)))]
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(got["calls"]) == 1, got["calls"]  # one collective, not one per tensor
        for name, value in zip(("image", "text", "ids", "labels"), want):
            assert got["keys"][name].dtype == value.dtype and torch.equal(got["keys"][name], value), name
    alone = GlobalKeys.gather(*step_keys(0, dtype))  # one process, no process group
    assert all(torch.equal(getattr(alone, name), value)
               for name, value in zip(("image", "text", "ids", "labels"), step_keys(0, dtype)))


def test_a_one_rank_process_group_runs_no_collective(monkeypatch, port):
    """DeepSpeed makes a process group even for one process; there the helpers return their input without a
    collective (each a one-rank gloo call of 40-90 us, three a training step)."""
    from fne_dist import distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        for name in ("all_reduce", "all_gather_single", "all_to_all_single"):
            monkeypatch.setattr(dist, name, lambda *args, name=name, **kwargs: pytest.fail(f"dist.{name} called"))
        t = torch.arange(6.0).view(3, 2)
        assert distributed.all_reduce(t) is t and torch.equal(t, torch.arange(6.0).view(3, 2))
        assert distributed.all_gather_cat(t) is t and distributed.all_to_all(t) is t
        assert distributed.ranks_where(True) == [0] and distributed.ranks_where(False) == []
    finally:
        dist.destroy_process_group()
