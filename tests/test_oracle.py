"""fne.oracle: every objective with the true false negatives (same label, another image) masked, in-batch and over
the buffer, against references: CLIP's InfoNCE without them in the denominator (ClipLoss itself when there are
none), VSE++ and the FNE triplet never picking them, the posterior InfoNCE without them."""
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from fne_dist.config import ConfigError, FNESection, load_config
from fne_dist.infonce import CandidateSet, dense_posterior_infonce
from fne_dist.losses import vsepp_hardest
from fne_dist.objective import Objective
from fne_dist.objectives.diagnostics import DIAGNOSTICS, summarise
from fne_dist.stats import SimilarityStats


def ready() -> SimilarityStats:
    return SimilarityStats.from_moments(count_pos=500, mean_pos=0.3, var_pos=0.01, mean_neg=0.0, var_neg=0.02)


def objective(**fne) -> Objective:
    return Objective(FNESection(**{"queue_size": 64, "impl": "torch", **fne}), dim=16, device=torch.device("cpu"),
                     seed=0)


def step(b=12, seed=0, group=3, id_offset=0):
    """One step's features; labels in groups of `group` (1: no false negatives)."""
    g = torch.Generator().manual_seed(seed)
    ia, ta, ik, tk = (F.normalize(torch.randn(b, 16, generator=g), dim=1) for _ in range(4))
    ids = torch.arange(b) + id_offset
    return ia.requires_grad_(), ta.requires_grad_(), ik, tk, ids, ids // group


def sums(out) -> dict:
    return dict(zip(DIAGNOSTICS, out.diagnostics.tolist()))


def test_oracle_clip_is_clip_loss_without_false_negatives():
    ia, ta, ik, tk, ids, labels = step(group=1)
    scale = torch.tensor([1 / 0.07], requires_grad=True)
    out = objective(objective="clip", oracle=True).loss(ia, ta, ik, tk, ids, labels, step=0, rank=0, warmup=False,
                                                         logit_scale=scale)
    want = ClipLoss()(ia, ta, scale)
    assert torch.equal(out.loss, want)
    grads = torch.autograd.grad(out.loss, (ia, ta, scale))
    assert all(torch.equal(g, w) for g, w in zip(grads, torch.autograd.grad(want, (ia, ta, scale))))


def test_oracle_clip_drops_same_label_pairs_from_the_denominator():
    ia, ta, ik, tk, ids, labels = step(group=3)
    t = 1 / 0.07
    out = objective(objective="clip", oracle=True).loss(ia, ta, ik, tk, ids, labels, step=0, rank=0, warmup=False,
                                                         logit_scale=torch.tensor([t]))
    s = (ia @ ta.T).detach()
    rows = []
    for sims in (s, s.T):
        for i in range(len(ids)):
            others = [t * sims[i, j] for j in range(len(ids)) if labels[j] != labels[i]]
            rows.append(-t * sims[i, i] + torch.logsumexp(torch.stack([t * sims[i, i], *others]), 0))
    assert math.isclose(out.loss.item(), torch.stack(rows).mean().item(), rel_tol=1e-5)
    plain = objective(objective="clip").loss(ia, ta, ik, tk, ids, labels, step=0, rank=0, warmup=False,
                                             logit_scale=torch.tensor([t]))
    assert out.loss < plain.loss  # fewer terms in every denominator
    assert summarise(sums(out))["false_negative_loss_share"] == 0 < summarise(sums(plain))["false_negative_loss_share"]


def test_oracle_vsepp_never_picks_a_false_negative():
    ia, ta, ik, tk, ids, labels = step(b=24, group=4)
    out = objective(objective="vsepp", oracle=True).loss(ia, ta, ik, tk, ids, labels, step=0, rank=0, warmup=False)
    # VSE++ with the labels as ids: the hardest negative of another group
    (cost_i2t, _), (cost_t2i, _) = vsepp_hardest(ia.float(), ta.float(), labels, 0.2)
    assert torch.equal(out.loss, (cost_i2t + cost_t2i).mean())
    got, plain = sums(out), sums(objective(objective="vsepp").loss(ia, ta, ik, tk, ids, labels, step=0, rank=0,
                                                                   warmup=False))
    assert got["labelled"] > 0 and got["false_negatives"] == 0 and plain["false_negatives"] > 0


@pytest.mark.parametrize("mode", ["hardness", "bayes", "official"])
def test_oracle_fne_triplet_never_draws_a_false_negative_from_batch_or_buffer(mode):
    """Five steps fill the buffer with earlier keys of the same groups; the oracle's draws over [batch ; queue]
    never share the anchor's label, the same run without it draws some."""
    counts = {}
    for oracle in (False, True):
        obj = objective(objective="fne", mode=mode, oracle=oracle)
        total = torch.zeros(len(DIAGNOSTICS), dtype=torch.float64)
        for n in range(5):
            ia, ta, ik, tk, ids, labels = step(b=16, seed=n, group=4, id_offset=16 * n)
            labels = labels % 6  # groups of 4 per step, 6 groups over the steps: false negatives in the queue too
            out = obj.loss(ia, ta, ik, tk, ids, labels, step=n, rank=0, warmup=False)
            obj.commit(out)
            total += out.diagnostics
        counts[oracle] = dict(zip(DIAGNOSTICS, total.tolist()))
    assert counts[True]["labelled"] == counts[False]["labelled"] == 5 * 2 * 16
    assert counts[True]["false_negatives"] == 0 < counts[False]["false_negatives"]


def test_oracle_posterior_infonce_is_the_reference_with_labels_as_ids():
    """Over [global batch ; queue]: the dense reference whose candidates of the anchor's label leave the
    denominator, and no softmax mass on false negatives."""
    obj = objective(objective="posterior_infonce", oracle=True)
    ia, ta, ik, tk, ids, labels = step(b=12, seed=1, group=3)
    obj.commit(obj.loss(ia, ta, ik, tk, ids, labels, step=0, rank=0, warmup=False, logit_scale=torch.tensor([10.0])))
    ia, ta, ik, tk, ids, labels = step(b=12, seed=2, group=3, id_offset=12)
    labels = labels - 2  # groups 2 and 3 of the queue come back: false negatives in the buffer
    stats = ready()
    stats.updated = lambda *args: stats  # hand-set statistics, so that the reference weighs with the same ones
    obj.stats = stats
    scale = torch.tensor([10.0], requires_grad=True)
    out = obj.loss(ia, ta, ik, tk, ids, labels, step=1, rank=0, warmup=False, logit_scale=scale)
    q = obj.buffer.queue
    want = 0
    for anchors, pos, pool in ((ia, tk, torch.cat([tk, q.text])), (ta, ik, torch.cat([ik, q.image]))):
        cand = CandidateSet(pool, torch.cat([labels, q.ids]), torch.cat([labels, q.labels]),
                            torch.cat([torch.ones(12, dtype=torch.bool), q.valid]), labels, labels)
        want = want + dense_posterior_infonce(anchors, scale, pos, cand, stats, obj.rule).mean() / 2
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    assert sums(out)["loss_false_negatives"] == 0
    plain = objective(objective="posterior_infonce")
    plain.buffer, plain.stats = obj.buffer, stats
    assert sums(plain.loss(ia, ta, ik, tk, ids, labels, step=1, rank=0, warmup=False,
                           logit_scale=scale))["loss_false_negatives"] > 0


def test_oracle_needs_every_label_and_is_a_config_setting():
    ia, ta, ik, tk, ids, labels = step()
    labels[3] = -1
    with pytest.raises(ValueError, match="fne.oracle=true masks false negatives by label"):
        objective(objective="vsepp", oracle=True).loss(ia, ta, ik, tk, ids, labels, step=0, rank=0, warmup=False)
    assert load_config("configs/demo.yaml", ["fne.oracle=true"]).fne.oracle is True
    with pytest.raises(ConfigError, match="fne.oracle"):
        load_config("configs/demo.yaml", ["fne.oracle=maybe"])


def two_rank_worker(rank: int, port: int, out: str):
    """Rank r holds pairs [8r, 8r + 8) of one global batch of 16 (labels in groups of 4, across the ranks)."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ia, ta, ik, tk, ids, labels = step(b=16, group=4)
    ids, labels = ids.remainder(16), (ids + 2).remainder(16) // 4  # groups 1 and 3 straddle the ranks
    mine = slice(8 * rank, 8 * rank + 8)
    clip = objective(objective="clip", oracle=True).loss(
        ia[mine].detach(), ta[mine].detach(), ik[mine], tk[mine], ids[mine], labels[mine], step=0, rank=rank,
        warmup=False, logit_scale=torch.tensor([10.0]))
    obj = objective(objective="fne", mode="hardness", oracle=True, buffer="sharded")
    picks = torch.zeros(len(DIAGNOSTICS), dtype=torch.float64)
    for n in range(3):
        out_n = obj.loss(ia[mine].detach(), ta[mine].detach(), ik[mine], tk[mine], ids[mine] + 100 * n, labels[mine],
                         step=n, rank=rank, warmup=False)
        obj.commit(out_n)
        picks += out_n.diagnostics
    torch.save({"clip": clip.loss, "picks": dict(zip(DIAGNOSTICS, picks.tolist()))}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_oracle_on_two_ranks_masks_across_the_global_batch_and_the_sharded_buffer(tmp_path, port):
    """CLIP's oracle over the gathered batch equals the one-process oracle over all 16 pairs; the FNE sampler over
    the sharded buffer draws no false negative, though each group has members on the other rank."""
    import torch.multiprocessing as mp

    mp.spawn(two_rank_worker, args=(port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ia, ta, ik, tk, ids, labels = step(b=16, group=4)
    ids, labels = ids.remainder(16), (ids + 2).remainder(16) // 4
    want = objective(objective="clip", oracle=True).loss(ia, ta, ik, tk, ids, labels, step=0, rank=0, warmup=False,
                                                          logit_scale=torch.tensor([10.0])).loss
    for got in ranks:
        torch.testing.assert_close(got["clip"], want, rtol=1e-6, atol=1e-6)
        assert got["picks"]["labelled"] == 3 * 2 * 8 and got["picks"]["false_negatives"] == 0
