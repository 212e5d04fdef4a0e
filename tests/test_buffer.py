"""The negative buffer on 1, 2 and 4 gloo ranks: the sharded buffer draws the same negatives, gives the same loss and
holds the same queue as the replicated one over steps that wrap the ring; a sharded checkpoint resumes bitwise; and
`Objective.loss` on several ranks equals one process on the concatenated batch (a wrong row offset fails it)."""
import os
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from fne_dist import checkpoint
from fne_dist.buffer import NegativeBuffer, block_range
from fne_dist.config import FNESection
from fne_dist.fne import SAMPLE_BLOCK
from fne_dist.objective import Objective
from fne_dist.objectives.diagnostics import DIAGNOSTICS
from fne_dist.queue import GlobalKeys, MomentumQueue

G, D, Q, STEPS, RESUME_AT = 160, 8, 640, 6, 3  # 6 x 160 = 960 keys into 640 slots: the ring wraps at step 4
# bayes with a low min_count: the posterior switches on within the run, so the statistics shape the draw
RULE = FNESection(queue_size=Q, mode="bayes", min_count=20, cutdown="global", stats_reset="never", impl="torch")
STATELESS = replace(RULE, mode="hardness", cutdown="anchor")  # weights that do not read the statistics


def batch(step: int, rows: slice, g: int = G):
    """Rows of the global batch (g rows) of a step: ia, ta, ik, tk [n, D], ids (some shared across rows), labels."""
    gen = torch.Generator().manual_seed(step)
    feats = [F.normalize(torch.randn(g, D, generator=gen), dim=1) for _ in range(4)]
    ids = torch.randint(0, 3 * g, (g,), generator=gen) + 10_000 * step
    return (*(t[rows] for t in feats), ids[rows], ids[rows] % 7)


def run(cfg: FNESection, rank: int, world: int, steps: range, objective: Objective | None = None, g: int = G):
    """Steps of Objective.loss + enqueue on this rank's rows of a g-row global batch: (objective, losses, indices
    per step, diagnostics per step)."""
    b = g // world
    objective = objective or Objective(cfg, D, torch.device("cpu"), seed=5)
    losses, indices, diagnostics = [], [], []
    for step in steps:
        ia, ta, ik, tk, ids, labels = batch(step, slice(rank * b, (rank + 1) * b), g)
        out = objective.loss(ia, ta, ik, tk, ids, labels, step=step, rank=rank, warmup=False)
        objective.commit(out)
        losses.append(out.loss)
        indices.append(out.index)
        diagnostics.append(out.diagnostics)
    return objective, torch.stack(losses), torch.stack(indices), torch.stack(diagnostics)


class FakeEngine:
    """DeepSpeed's part of a checkpoint, left out: the buffer and the statistics are what is tested here."""

    def zero_optimization_stage(self):
        return 0

    def save_checkpoint(self, save_dir, tag, save_latest):
        pass

    def load_checkpoint(self, load_dir, tag, **kwargs):
        return load_dir, None


def worker(rank: int, world: int, port: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for layout in ("replicated", "sharded"):
        objective, losses, indices, diagnostics = run(replace(RULE, buffer=layout), rank, world, range(STEPS))
        results[layout] = {"losses": losses, "indices": indices, "diagnostics": diagnostics,
                           "queue": objective.buffer.state_dict()}
        results[f"{layout}-stateless"] = run(replace(STATELESS, buffer=layout), rank, world, range(STEPS))[1:3]
    # sharded: save after RESUME_AT steps, restore into a fresh objective, continue
    cfg = replace(RULE, buffer="sharded")
    objective = run(cfg, rank, world, range(RESUME_AT))[0]
    saved = checkpoint.save(FakeEngine(), f"{out}/ckpt", progress=checkpoint.Progress(step=RESUME_AT), config={},
                            architecture={}, momentum=torch.nn.Linear(1, 1), objective=objective)
    fresh = Objective(cfg, D, torch.device("cpu"), seed=5)
    checkpoint.load(FakeEngine(), saved, state=checkpoint.read_state(saved), momentum=torch.nn.Linear(1, 1),
                    objective=fresh)
    results["resumed"] = run(cfg, rank, world, range(RESUME_AT, STEPS), fresh)[1:3]
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[1, 2, 4])
def ranks(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"world{world}")
    from conftest import free_port

    mp.spawn(worker, args=(world, free_port(), str(out)), nprocs=world)
    return world, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def test_sharded_buffer_draws_and_holds_what_the_replicated_one_does(ranks):
    world, results = ranks
    for rank, got in enumerate(results):
        rep, shard = got["replicated"], got["sharded"]
        assert torch.equal(shard["indices"], rep["indices"]), f"rank {rank}"
        assert torch.equal(shard["losses"], rep["losses"]), f"rank {rank}"
        assert torch.equal(shard["diagnostics"], rep["diagnostics"]), f"rank {rank}"  # the at-risk count too
        assert rep["diagnostics"][:, DIAGNOSTICS.index("at_risk")].sum() > 0
        drawn = rep["indices"]
        assert (drawn >= G).any() and ((drawn >= 0) & (drawn < G)).any()  # both segments are drawn from
    # the shards, in rank order, are the replicated queue; each rank holds about Q / world slots
    whole = results[0]["replicated"]["queue"]
    shards = [got["sharded"]["queue"] for got in results]
    assert [s["slots"] for s in shards] == [block_range(Q, world, r) for r in range(world)]
    for name in MomentumQueue.BUFFERS:
        assert torch.equal(torch.cat([s[name] for s in shards]), whole[name]), name
    assert max(len(s["ids"]) for s in shards) <= -(-Q // (world * SAMPLE_BLOCK)) * SAMPLE_BLOCK
    assert whole["valid"].all()


def test_sharded_checkpoint_resumes_bitwise(ranks):
    world, results = ranks
    for got in results:
        losses, indices = got["resumed"]
        assert torch.equal(losses, got["sharded"]["losses"][RESUME_AT:])
        assert torch.equal(indices, got["sharded"]["indices"][RESUME_AT:])


def test_ranks_draw_and_lose_what_one_process_does_on_the_concatenated_batch(ranks):
    world, results = ranks
    _, want_losses, want_indices, _ = run(STATELESS, 0, 1, range(STEPS))  # one process, the whole global batch
    b = G // world
    for layout in ("replicated-stateless", "sharded-stateless"):
        losses = torch.stack([got[layout][0] for got in results])
        indices = torch.cat([got[layout][1] for got in results], dim=-1)
        assert torch.equal(indices, want_indices), layout
        torch.testing.assert_close(losses.mean(0), want_losses, rtol=1e-6, atol=1e-7)
        assert indices.shape[-1] == world * b


def small_ring_worker(rank: int, world: int, port: int, out: str, queue_dtype: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = replace(RULE, queue_size=SAMPLE_BLOCK, queue_dtype=queue_dtype)
    results = {layout: run(replace(cfg, buffer=layout), rank, world, range(3), g=SAMPLE_BLOCK)[1:]
               for layout in ("replicated", "sharded")}
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("queue_dtype", ["bfloat16", "float32"])
def test_a_rank_without_candidates_draws_what_the_replicated_buffer_does(queue_dtype, tmp_path, port):
    """A ring and a global batch of one block each on 2 ranks: rank 1 holds no candidates, and its placeholder
    partials must match the others' in dtype and shape (else the all-to-all's byte counts differ: gloo aborts,
    NCCL hangs)."""
    mp.spawn(small_ring_worker, args=(2, port, str(tmp_path), queue_dtype), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for rep, shard in zip(got["replicated"], got["sharded"]):  # losses, indices, diagnostics
            assert torch.equal(shard, rep), f"rank {rank}"
        assert (got["replicated"][1] >= 0).all()  # every anchor got a negative


def test_shards_are_whole_blocks_that_cover_the_segment():
    for n in (1, 127, 128, 640, 1000, 4096):
        for world in (1, 2, 3, 4, 8):
            bounds = [block_range(n, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert all(lo % SAMPLE_BLOCK == 0 or lo == n for lo, _ in bounds)  # empty shares sit at n
            blocks = [-(-(hi - lo) // SAMPLE_BLOCK) for lo, hi in bounds]
            assert max(blocks) - min(blocks) <= 1


def test_segments_are_views_of_the_ring_at_global_columns():
    buffer = NegativeBuffer(300, 4, torch.float32, "cpu", layout="sharded", rank=1, world=2)
    keys = GlobalKeys(torch.ones(200, 4), torch.zeros(200, 4), torch.arange(200), torch.zeros(200, dtype=torch.long))
    segments = buffer.segments(keys)
    assert [(s.col_offset, len(s)) for s in segments] == [(128, 72), (200 + 256, 44)]
    assert segments[1].image.data_ptr() == buffer.queue.image.data_ptr()  # the ring itself, not a copy
    with pytest.raises(ValueError, match="fne.buffer='striped' is unknown"):
        NegativeBuffer(300, 4, torch.float32, "cpu", layout="striped")


def test_a_draw_takes_every_direction_at_once():
    """The buffer draws a step's two directions in one call ([2, b, D]; field for field the one-direction draws:
    tests/test_sampler.py); one direction's [b, D] is refused with the fix, not misread."""
    from fne_dist.fne import FNEConfig, SimilarityStats

    buffer = NegativeBuffer(256, 8, torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    keys = GlobalKeys(*(F.normalize(torch.randn(16, 8, generator=g), dim=1) for _ in range(2)), torch.arange(16),
                      torch.full((16,), -1))
    buffer.enqueue(keys)
    anchors, pos_sims = F.normalize(torch.randn(2, 16, 8, generator=g), dim=2), torch.full((2, 16), 0.5)
    stats, rule = SimilarityStats(), FNEConfig(cutdown="off")
    neg = buffer.draw(anchors, pos_sims, keys.ids, keys, stats, rule, row_offset=0)
    assert neg.keys.shape == (2, 16, 8) and neg.ids.shape == neg.sample.index.shape == (2, 16)
    assert neg.sample.has_negative.all()
    # direction 0 takes text keys, 1 image keys: global column c < 16 is the batch's row c, else ring slot c - 16
    for direction, (batch_keys, ring_keys) in enumerate(((keys.text, buffer.queue.text),
                                                         (keys.image, buffer.queue.image))):
        column = neg.sample.index[direction]
        want = torch.where(column[:, None] < 16, batch_keys[column % 16], ring_keys[(column - 16).clamp(min=0)])
        assert torch.equal(neg.keys[direction], want)
    with pytest.raises(ValueError, match=r"anchors \[K, b, D\].*torch.stack"):
        buffer.draw(anchors[0], pos_sims[0], keys.ids, keys, stats, rule, row_offset=0)
