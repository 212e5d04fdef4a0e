"""The posterior InfoNCE objectives over the buffer in both layouts: on 1, 2 and 4 gloo ranks the sharded buffer gives
the replicated buffer's losses, diagnostics and gradients (anchors and logit scale), fp32 and bf16 keys, with a ring
smaller than world x SAMPLE_BLOCK (the last ranks hold no candidates) through wrap-around, and both equal the dense
reference over the joined candidates; the queue-only form (for objectives that read the queue alone) too; on 2 ranks
the same through the fused Triton kernels (impl="triton", the interpreter); and a step reads the ring in place (no
allocation as large as the ring)."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from conftest import gloo_ranks
from fne_dist.buffer import block_range
from fne_dist.config import FNESection
from fne_dist.fne import SAMPLE_BLOCK
from fne_dist.infonce import CandidateSet, dense_posterior_infonce
from fne_dist.objective import Objective
from fne_dist.queue import GlobalKeys

# 4 steps of 160 keys into 320 slots: empty, half full, full, wrapped; 320 slots and 160 batch columns are 3 and 2
# blocks, so on 4 ranks rank 3 holds no candidate at all and rank 2 only ring slots
G, D, Q, STEPS, SCALE = 160, 8, 320, 4, 1 / 0.07
# the posterior switches on within the run (low min_count), so log(1 - f) shapes the logits
RULE = FNESection(objective="posterior_infonce", queue_size=Q, min_count=20, stats_reset="never", impl="torch")


def batch(step: int, rows: slice):
    """Rows of a step's global batch: ia, ta (pairs close to their keys), ik, tk [n, D], ids (some repeated: the same
    image under two captions), labels (groups of 7: false negatives)."""
    gen = torch.Generator().manual_seed(step)
    ik = F.normalize(torch.randn(G, D, generator=gen), dim=1)
    tk = F.normalize(ik + 0.7 * torch.randn(G, D, generator=gen), dim=1)
    ia, ta = (F.normalize(k + 0.3 * torch.randn(G, D, generator=gen), dim=1) for k in (ik, tk))
    ids = torch.randint(0, 3 * G, (G,), generator=gen) + 10_000 * step
    return (*(t[rows] for t in (ia, ta, ik, tk)), ids[rows], ids[rows] % 7)


def dense_loss(objective: Objective, keys: GlobalKeys, ia, ta, ik, tk, ids, labels, stats, scale):
    """The objective's loss from the dense reference over [global batch ; queue] joined (the replicated buffer)."""
    segments = objective.buffer.segments(keys)
    joined = {name: torch.cat([getattr(s, name) if getattr(s, name) is not None else torch.ones_like(s.ids, dtype=bool)
                               for s in segments]) for name in ("text", "image", "ids", "labels", "valid")}
    loss = 0
    for anchors, pos_keys, pool in ((ia, tk, "text"), (ta, ik, "image")):
        cand = CandidateSet(joined[pool], joined["ids"], joined["labels"], joined["valid"], ids, labels)
        loss = loss + dense_posterior_infonce(anchors, scale, pos_keys, cand, stats, objective.rule).mean() / 2
    return loss


def run(cfg: FNESection, rank: int, world: int, *, dense: bool = False, steps: int = STEPS):
    """`steps` of Objective.loss, its gradients and commit on this rank's rows: per step the loss, the gradients
    of ia, ta and the logit scale, the diagnostics (and with `dense` the dense reference's loss and gradients)."""
    b = G // world
    objective = Objective(cfg, D, torch.device("cpu"), seed=5)
    got = []
    for step in range(steps):
        ia, ta, ik, tk, ids, labels = batch(step, slice(rank * b, (rank + 1) * b))
        ia, ta = ia.requires_grad_(), ta.requires_grad_()
        scale = torch.tensor([SCALE], requires_grad=True)
        out = objective.loss(ia, ta, ik, tk, ids, labels, step=step, rank=rank, warmup=False, logit_scale=scale)
        row = {"loss": out.loss.detach(), "grads": torch.autograd.grad(out.loss, (ia, ta, scale)),
               "diagnostics": out.diagnostics}
        if dense:
            want = dense_loss(objective, out.keys, ia, ta, ik, tk, ids, labels, out.stats, scale)
            row |= {"dense_loss": want.detach(), "dense_grads": torch.autograd.grad(want, (ia, ta, scale))}
        objective.commit(out)
        got.append(row)
    return got


def both_layouts(rank: int, world: int):
    return {(layout, dtype): run(replace(RULE, buffer=layout, queue_dtype=dtype), rank, world,
                                 dense=layout == "replicated")
            for layout in ("replicated", "sharded") for dtype in ("float32", "bfloat16")}


@pytest.fixture(scope="module", params=[1, 2, 4])
def ranks(request, tmp_path_factory):
    world = request.param
    return world, gloo_ranks(both_layouts, world, tmp_path_factory.mktemp(f"world{world}"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sharded_infonce_equals_the_replicated_one(ranks, dtype):
    world, results = ranks
    if world == 4:  # the case the test is for: the last rank holds no candidates
        assert block_range(G, world, 3)[0] == G and block_range(Q, world, 3)[0] == Q < world * SAMPLE_BLOCK
    for rank, got in enumerate(results):
        for step, (rep, shard) in enumerate(zip(got["replicated", dtype], got["sharded", dtype])):
            where = f"rank {rank} step {step}"
            # fp32 sums in another order (shard partials combined, the positive last): rounding only
            torch.testing.assert_close(shard["loss"], rep["loss"], rtol=1e-6, atol=1e-6, msg=where)
            torch.testing.assert_close(shard["diagnostics"], rep["diagnostics"], rtol=1e-5, atol=1e-6, msg=where)
            for g_shard, g_rep in zip(shard["grads"], rep["grads"]):
                torch.testing.assert_close(g_shard, g_rep, rtol=1e-5, atol=1e-6, msg=where)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_buffer_infonce_equals_the_dense_reference(ranks, dtype):
    _, results = ranks
    for got in results:
        for step, rep in enumerate(got["replicated", dtype]):
            # the tolerances of tests/test_objectives.py's streamed-against-dense test (logits up to 1/0.07)
            torch.testing.assert_close(rep["loss"], rep["dense_loss"], rtol=1e-5, atol=1e-5, msg=f"step {step}")
            for g, want in zip(rep["grads"], rep["dense_grads"]):
                torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5, msg=f"step {step}")
            assert rep["diagnostics"].isfinite().all() and rep["diagnostics"][-1] > 0  # false-negative mass seen


def fused_layouts(rank: int, world: int):
    """Three steps of both layouts through the Triton kernels (impl="triton"; the interpreter on the CPU, fp32 keys:
    bf16 is wrong there) and of the replicated buffer through the torch tiles."""
    return {(layout, impl): run(replace(RULE, buffer=layout, impl=impl, queue_dtype="float32"), rank, world,
                                steps=3)
            for layout, impl in (("replicated", "triton"), ("sharded", "triton"), ("replicated", "torch"))}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gloo ranks hold CPU tensors: the kernels run in Triton's "
                    "interpreter, which conftest.py turns on only where there is no GPU")
def test_sharded_triton_infonce_equals_the_replicated_one(tmp_path):
    """impl="triton" on 2 gloo ranks: every rank reads its runs (its part of the batch, its ring slots) with the
    kernels against all G anchors and the partials are exchanged; losses, diagnostics and gradients equal the
    replicated buffer's through the kernels (two runs: batch and queue) up to fp32 rounding (other runs, other
    splits: rtol 1e-5), and those equal the torch tiles' (the kernels' tolerances, tests/test_triton_infonce.py)."""
    for rank, got in enumerate(gloo_ranks(fused_layouts, 2, tmp_path)):
        steps = zip(got["sharded", "triton"], got["replicated", "triton"], got["replicated", "torch"])
        for step, (shard, rep, tiles) in enumerate(steps):
            where = f"rank {rank} step {step}"
            torch.testing.assert_close(shard["loss"], rep["loss"], rtol=1e-5, atol=1e-6, msg=where)
            torch.testing.assert_close(shard["diagnostics"], rep["diagnostics"], rtol=1e-5, atol=1e-6, msg=where)
            for g_shard, g_rep in zip(shard["grads"], rep["grads"]):
                torch.testing.assert_close(g_shard, g_rep, rtol=1e-5, atol=1e-6, msg=where)
            torch.testing.assert_close(rep["loss"], tiles["loss"], rtol=1e-5, atol=1e-5, msg=where)
            for g_rep, g_tiles in zip(rep["grads"], tiles["grads"]):
                torch.testing.assert_close(g_rep, g_tiles, rtol=1e-4, atol=1e-5, msg=where)


def queue_only(rank: int, world: int):
    """Each rank's queue-only InfoNCE in both layouts after two steps (a full ring), with its gradients."""
    b, results = G // world, {}
    for layout in ("replicated", "sharded"):
        objective = Objective(replace(RULE, buffer=layout), D, torch.device("cpu"), seed=5)
        for step in range(2):
            step_loss = objective.loss(*batch(step, slice(rank * b, (rank + 1) * b)), step=step, rank=rank,
                                       warmup=False, logit_scale=torch.tensor([SCALE]))
            objective.commit(step_loss)
        ia, _, ik, tk, ids, labels = batch(2, slice(rank * b, (rank + 1) * b))
        ia = ia.requires_grad_()
        keys = GlobalKeys.gather(ik, tk, ids, labels)
        rows, false_prob = objective.buffer.infonce(ia, torch.tensor(SCALE), tk, ids, labels, keys, step_loss.stats,
                                                    objective.rule, direction=0, queue_only=True)
        queue = objective.buffer.queue
        results[layout] = (rows.detach(), false_prob, torch.autograd.grad(rows.sum(), ia)[0], queue.text.clone(),
                           queue.ids.clone(), queue.labels.clone(), step_loss.stats)
    return results


def test_queue_only_infonce_reads_the_queue_alone_in_both_layouts(tmp_path):
    b = G // 2
    for rank, got in enumerate(gloo_ranks(queue_only, 2, tmp_path)):
        rows, false_prob, grad, text, key_ids, key_labels, stats = got["replicated"]
        ia, _, _, tk, ids, labels = batch(2, slice(rank * b, (rank + 1) * b))
        ia = ia.requires_grad_()
        cand = CandidateSet(text, key_ids, key_labels, torch.ones(Q, dtype=torch.bool), ids, labels)
        want = dense_posterior_infonce(ia, torch.tensor(SCALE), tk, cand, stats, RULE.rule())
        torch.testing.assert_close(rows, want.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, torch.autograd.grad(want.sum(), ia)[0], rtol=1e-4, atol=1e-5)
        (s_rows, s_false_prob, s_grad), (r_rows, r_false_prob, r_grad) = got["sharded"][:3], got["replicated"][:3]
        torch.testing.assert_close(s_rows, r_rows, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s_false_prob, r_false_prob, rtol=1e-5, atol=1e-6)
        # per-row gradients (of the rows' sum, up to t = 14.3 in size): fp32 rounding, as against the reference
        torch.testing.assert_close(s_grad, r_grad, rtol=1e-4, atol=1e-5)


def test_a_step_reads_the_ring_in_place():
    """No operation of a step (loss and backward) allocates as much as half of one direction's ring keys: the
    segments are read tile by tile where they lie (the previous objective joined them, a copy of the ring per step)."""
    queue, b, dim = 4096, 8, 64
    objective = Objective(replace(RULE, queue_size=queue, buffer="replicated"), dim, torch.device("cpu"), seed=5)
    gen = torch.Generator().manual_seed(0)
    unit = lambda n: F.normalize(torch.randn(n, dim, generator=gen), dim=1)  # noqa: E731
    ring_ids = torch.arange(queue) + b
    objective.buffer.enqueue(GlobalKeys(unit(queue), unit(queue), ring_ids, ring_ids % 7))  # a full ring
    ia, ta = unit(b).requires_grad_(), unit(b).requires_grad_()
    ids = torch.arange(b)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = objective.loss(ia, ta, unit(b), unit(b), ids, ids % 7, step=0, rank=0, warmup=False,
                             logit_scale=torch.tensor([SCALE], requires_grad=True))
        out.loss.backward()
    ring_keys = objective.buffer.queue.text.nbytes
    largest = max(event.self_cpu_memory_usage for event in prof.events())
    assert 0 < largest < ring_keys / 2, (largest, ring_keys)
