"""clip_queue (ClipLoss + a (1 - f)-weighted InfoNCE against the queue) and soft_clip (in-batch InfoNCE with the
posterior's soft targets) against ClipLoss and dense references written out here; the calibration table."""
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from fne_dist.config import ConfigError, FNESection, check_world, load_config
from fne_dist.objective import Objective
from fne_dist.objectives.diagnostics import calibration_table
from fne_dist.objectives.soft_clip import soft_targets
from fne_dist.queue import GlobalKeys
from fne_dist.stats import SimilarityStats
from fne_dist.weights import true_negative_prob

# a posterior that is on and calls pairs above ~0.5 false negatives (momentum similarities of random 8-d unit
# vectors reach that)
READY = SimilarityStats.from_moments(count_pos=500, mean_pos=0.7, var_pos=0.01, mean_neg=0.0, var_neg=0.05)
NOT_READY = SimilarityStats.from_moments(count_pos=10, mean_pos=0.7, var_pos=0.01, mean_neg=0.0, var_neg=0.05)
D = 8


def unit(*shape, generator):
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


def features(b=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ia, ta = unit(b, D, generator=g).requires_grad_(), unit(b, D, generator=g).requires_grad_()
    # momentum keys near the online features, so that pairs are likelier positives than others
    ik, tk = (F.normalize(x.detach() + 0.3 * unit(b, D, generator=g), dim=-1) for x in (ia, ta))
    ids = torch.arange(b) + 1000
    labels = ids % 3
    return ia, ta, ik, tk, ids, labels


def make(objective, stats=READY, queue=40, seed=1, **fne):
    """An Objective whose statistics stay `stats` and whose queue holds `queue` random keys (ids 0..queue-1, some
    valid slots left empty when queue < the ring)."""
    obj = Objective(FNESection(objective=objective, queue_size=64, impl="torch", **fne), dim=D,
                    device=torch.device("cpu"), seed=0)
    obj.stats = stats
    obj.stats.updated = lambda *args: stats
    if queue and obj.buffer is not None:  # only the objectives that read a buffer hold one
        g = torch.Generator().manual_seed(seed)
        ids = torch.arange(queue)
        obj.buffer.enqueue(GlobalKeys(unit(queue, D, generator=g), unit(queue, D, generator=g), ids, ids % 3))
    return obj


def loss_and_grads(obj, epoch, b=10):
    ia, ta, ik, tk, ids, labels = features(b)
    scale = torch.tensor([1 / 0.07], requires_grad=True)
    out = obj.loss(ia, ta, ik, tk, ids, labels, step=0, rank=0, warmup=False, logit_scale=scale, epoch=epoch)
    return out, torch.autograd.grad(out.loss, (ia, ta, scale)), (ia, ta, ik, tk, ids, labels, scale)


def clip_reference(ia, ta, scale):
    loss = ClipLoss()(ia, ta, scale)
    return loss, torch.autograd.grad(loss, (ia, ta, scale))


def test_clip_queue_is_clip_before_its_start_epoch_and_with_weight_zero():
    for obj, epoch in ((make("clip_queue", queue_start_epoch=2), 1), (make("clip_queue", queue_weight=0.0), 5)):
        out, grads, (ia, ta, *_, scale) = loss_and_grads(obj, epoch)
        want, want_grads = clip_reference(ia, ta, scale)
        assert torch.equal(out.loss, want)
        assert all(torch.equal(g, w) for g, w in zip(grads, want_grads))


def dense_memory_term(ia, ta, ik, tk, ids, scale, queue, stats, rule):
    """The memory term written out: per direction, InfoNCE of each anchor (positive: its pair's momentum key)
    against every valid queue key of another id, each negative's exp-logit times 1 - f; mean over rows and the
    two directions."""
    terms = []
    for anchors, pos_keys, keys in ((ia, tk, queue.text), (ta, ik, queue.image)):
        s = anchors @ keys.T
        weight = true_negative_prob(s.detach(), stats, rule)
        keep = queue.valid[None, :] & (ids[:, None] != queue.ids[None, :])
        neg = (weight * (scale * s).exp() * keep).sum(1)
        pos = (scale * (anchors * pos_keys).sum(1)).exp()
        terms.append(-(pos / (pos + neg)).log().mean())
    return sum(terms) / 2


@pytest.mark.parametrize("prior_ratio", [100.0, 1e30], ids=["posterior", "posterior-off"])
def test_clip_queue_adds_the_weighted_memory_term(prior_ratio):
    obj = make("clip_queue", queue_weight=0.7, prior_ratio=prior_ratio)
    out, grads, (ia, ta, ik, tk, ids, labels, scale) = loss_and_grads(obj, epoch=1)
    clip = ClipLoss()(ia, ta, scale)
    memory = dense_memory_term(ia, ta, ik, tk, ids, scale, obj.buffer.queue, READY, obj.rule)
    want = clip + 0.7 * memory
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    want_grads = torch.autograd.grad(want, (ia, ta, scale))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    if prior_ratio == 1e30:  # posterior off: plain InfoNCE against the memory (XBM-style)
        assert torch.equal(true_negative_prob(ia @ obj.buffer.queue.text.T, READY, obj.rule), torch.ones(10, 64))
    else:  # the posterior does weigh some candidate
        assert (true_negative_prob(ia.detach() @ obj.buffer.queue.text.T, READY, obj.rule) < 0.5).any()


def test_clip_queue_with_an_empty_queue_is_clip():
    obj = make("clip_queue", queue=0)
    out, _, (ia, ta, *_, scale) = loss_and_grads(obj, epoch=3)
    torch.testing.assert_close(out.loss, ClipLoss()(ia, ta, scale))


def test_clip_queue_needs_the_epoch_and_runs_on_either_buffer_layout():
    """The memory term reads the queue through NegativeBuffer.infonce, sharded or not (its equality across layouts:
    tests/test_sharded_infonce.py), so fne.buffer=auto on several ranks is a valid setting."""
    with pytest.raises(ValueError, match="epoch"):
        loss_and_grads(make("clip_queue"), epoch=None)
    assert Objective(FNESection(objective="clip_queue", buffer="sharded", queue_size=64), dim=D,
                     device=torch.device("cpu"), seed=0).buffer.sharded
    cfg = load_config("configs/demo.yaml", ["fne.objective=clip_queue", "fne.buffer=auto"])
    assert check_world(cfg, 2) == 2 * cfg.data.batch_size


@pytest.mark.parametrize("stats, alpha", [(READY, 0.0), (NOT_READY, 0.6)], ids=["alpha-0", "posterior-not-ready"])
def test_soft_clip_is_clip_with_alpha_zero_or_without_a_posterior(stats, alpha):
    out, grads, (ia, ta, *_, scale) = loss_and_grads(make("soft_clip", stats=stats, soft_alpha=alpha), epoch=None)
    want, want_grads = clip_reference(ia, ta, scale)
    torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=1e-7)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_soft_clip_with_the_uniform_teacher_is_label_smoothing():
    alpha = 0.3
    out, grads, (ia, ta, *_, scale) = loss_and_grads(make("soft_clip", soft_alpha=alpha, soft_teacher="uniform"), None)
    logits = scale * ia @ ta.T
    rows = torch.arange(len(ia))
    want = (F.cross_entropy(logits, rows, label_smoothing=alpha) + F.cross_entropy(logits.T, rows,
                                                                                   label_smoothing=alpha)) / 2
    torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=1e-7)
    for g, w in zip(grads, torch.autograd.grad(want, (ia, ta, scale))):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_soft_clip_against_targets_written_out():
    alpha = 0.3
    out, grads, (ia, ta, ik, tk, ids, labels, scale) = loss_and_grads(make("soft_clip", soft_alpha=alpha), None)
    f = 1 - true_negative_prob(ik @ tk.T, READY, make("soft_clip").rule)  # P(positive | momentum similarity)
    b = len(ids)

    def target(p):
        rows = []
        for i in range(b):
            one_hot = torch.zeros(b)
            one_hot[i] = 1
            rows.append(one_hot if p[i].sum() == 0 else (1 - alpha) * one_hot + alpha * p[i] / p[i].sum())
        return torch.stack(rows)

    logits = scale * ia @ ta.T
    want = (-(target(f) * logits.log_softmax(1)).sum(1).mean() - (target(f.T) * logits.T.log_softmax(1)).sum(1).mean()) / 2
    assert 0 < (target(f) - torch.eye(b)).abs().sum()  # the posterior moves some targets
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(grads, torch.autograd.grad(want, (ia, ta, scale))):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_soft_targets_rows():
    p = torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.6, 0.2], [0.0, 0.5, 0.5]])
    t = soft_targets(p, 0.4)
    want = torch.tensor([[1.0, 0.0, 0.0], [0.08, 0.84, 0.08], [0.0, 0.2, 0.8]])
    torch.testing.assert_close(t, want)
    torch.testing.assert_close(t.sum(1), torch.ones(3))


def test_calibration_table_counts_and_shares_per_bin():
    f = torch.tensor([[0.05, 0.15, 0.95], [0.12, 1.0, 0.99]])
    fn = torch.tensor([[False, True, True], [False, True, False]])
    table = calibration_table(f, fn, bins=10)
    assert [row["count"] for row in table] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 3]
    assert table[1] == {"lo": 0.1, "hi": 0.2, "count": 2, "mean_f": pytest.approx(0.135), "false_negatives": 1,
                        "share": 0.5}
    assert table[9]["false_negatives"] == 2 and table[9]["share"] == pytest.approx(2 / 3)
    assert math.isnan(table[4]["share"]) and math.isnan(table[4]["mean_f"])
    with pytest.raises(ValueError, match="same shape"):
        calibration_table(f, fn[0])


def test_settings_are_checked_with_a_clear_error():
    cfg = load_config("configs/demo.yaml", ["fne.objective=clip_queue", "fne.queue_weight=0.5",
                                            "fne.queue_start_epoch=0", "fne.neg_fit=all", "fne.prior_fit=true"])
    fne = cfg.fne
    assert (fne.queue_weight, fne.queue_start_epoch, fne.neg_fit, fne.prior_fit) == (0.5, 0, "all", True)
    for name in ("clip_queue", "soft_clip"):  # the posterior's default prior, as for posterior_infonce
        assert FNESection(objective=name).rule().prior_ratio == 100.0
    for override, key in (("fne.neg_fit=median", "fne.neg_fit"), ("fne.soft_alpha=1.5", "fne.soft_alpha"),
                          ("fne.queue_weight=-1", "fne.queue_weight"), ("fne.queue_start_epoch=-1",
                                                                         "fne.queue_start_epoch")):
        with pytest.raises(ConfigError, match=key):
            load_config("configs/demo.yaml", [override])


def steps_on_rows(objective, rank, world, g_batch=12, steps=3):
    """Losses of `steps` steps of `objective` on this rank's rows of fixed global batches (each step committed, so
    that the queue fills), the statistics held at READY."""
    obj = make(objective, queue=0, queue_start_epoch=0, queue_weight=0.5, buffer="replicated")
    b = g_batch // world
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        ia, ta, ik, tk = (unit(g_batch, D, generator=g)[rank * b:(rank + 1) * b] for _ in range(4))
        ids = torch.arange(g_batch)[rank * b:(rank + 1) * b] + 100 * step
        out = obj.loss(ia, ta, ik, tk, ids, ids % 3, step=step, rank=rank, warmup=False,
                       logit_scale=torch.tensor([10.0]), epoch=0)
        obj.commit(out)
        losses.append(out.loss)
    return torch.stack(losses)


def rank_worker(rank, world, port, out):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.save({name: steps_on_rows(name, rank, world) for name in ("soft_clip", "clip_queue")},
               f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_lose_what_one_process_does_on_the_global_batch(tmp_path):
    """soft_clip: every rank's loss is the global batch's (ClipLoss's convention); clip_queue: ClipLoss's global
    loss + the memory term over the rank's rows, so the ranks' mean is one process's loss."""
    import torch.multiprocessing as mp

    from conftest import free_port

    mp.spawn(rank_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in ("soft_clip", "clip_queue"):
        want = steps_on_rows(name, 0, 1)
        got = torch.stack([r[name] for r in ranks])
        torch.testing.assert_close(got.mean(0), want, rtol=1e-6, atol=1e-6)
        if name == "soft_clip":
            torch.testing.assert_close(got[0], got[1], rtol=1e-6, atol=1e-6)
