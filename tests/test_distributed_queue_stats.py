"""Two gloo processes: replicated queues stay identical through wrap-around and merged statistics equal
those of one process that sees every rank's batches."""
import os

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
