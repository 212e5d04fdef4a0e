"""The objectives beside the FNE triplet: CLIP's ClipLoss, the streaming posterior-weighted InfoNCE against its
dense autograd reference, eliminate rows skipped and counted, the (1 - f) hinge weight, and their config."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from fne_dist.config import ConfigError, FNESection, load_config
from fne_dist.infonce import CandidateSet, dense_posterior_infonce, posterior_infonce
from fne_dist.objective import Objective, momentum_keys, sizing_advice, unused_settings, uses_posterior
from fne_dist.objectives import REGISTRY, objective_class
from fne_dist.objectives.base import ObjectiveOutput, StepFeatures, StepObjective
from fne_dist.objectives.diagnostics import DIAGNOSTICS, summarise
from fne_dist.objectives.triplet import VSEpp
from fne_dist.queue import GlobalKeys
from fne_dist.stats import SimilarityStats
from fne_dist.weights import FNEConfig, true_negative_prob

READY = SimilarityStats.from_moments(count_pos=500, mean_pos=0.3, var_pos=0.01, mean_neg=0.0, var_neg=0.02)
NOT_READY = SimilarityStats.from_moments(count_pos=10, mean_pos=0.3, var_pos=0.01, mean_neg=0.0, var_neg=0.02)


def unit(*shape, generator):
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


def objective(**fne) -> Objective:
    return Objective(FNESection(**{"queue_size": 64, "impl": "torch", **fne}), dim=16, device=torch.device("cpu"),
                     seed=0)


def features(b=12, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ia, ta = unit(b, d, generator=g).requires_grad_(), unit(b, d, generator=g).requires_grad_()
    ik, tk = unit(b, d, generator=g), unit(b, d, generator=g)
    ids = torch.arange(b)
    labels = torch.arange(b) // 3  # groups of three: the other two are false negatives
    return ia, ta, ik, tk, ids, labels


def test_clip_objective_is_open_clips_clip_loss():
    ia, ta, ik, tk, ids, labels = features()
    scale = torch.tensor([1 / 0.07], requires_grad=True)
    out = objective(objective="clip").loss(ia, ta, ik, tk, ids, labels, step=0, rank=0, warmup=True,
                                           logit_scale=scale)
    want = ClipLoss()(ia, ta, scale)
    assert torch.equal(out.loss, want)
    grads = torch.autograd.grad(out.loss, (ia, ta, scale))
    want_grads = torch.autograd.grad(want, (ia, ta, scale))
    assert all(torch.equal(g, w) for g, w in zip(grads, want_grads))
    # the in-batch softmax mass on false negatives is measured from the group labels
    shares = summarise(dict(zip(DIAGNOSTICS, out.diagnostics.tolist())))
    assert 0 < shares["false_negative_loss_share"] < 1 and "false_negative_share" not in shares


def test_scaled_objectives_need_the_logit_scale():
    with pytest.raises(ValueError, match="logit_scale"):
        objective(objective="posterior_infonce").loss(*features(), step=0, rank=0, warmup=False)


class MeanCosine(StepObjective):
    """A new objective as a user would add it: pull each pair toward its keys, nothing else (it reads the keys, so
    it declares it; no buffer)."""

    reads_keys = True

    def __call__(self, x: StepFeatures) -> ObjectiveOutput:
        loss = 2 - (x.ia * x.tk).sum(1).mean() - (x.ta * x.ik).sum(1).mean()
        return ObjectiveOutput(loss, torch.zeros(len(DIAGNOSTICS), dtype=torch.float64))


def test_a_new_objective_is_one_class_and_one_registry_line(monkeypatch):
    monkeypatch.setitem(REGISTRY, "mean_cosine", f"{__name__}:MeanCosine")
    cfg = load_config("configs/demo.yaml", ["fne.objective=mean_cosine"])
    obj = Objective(replace(cfg.fne, impl="torch"), dim=16, device=torch.device("cpu"), seed=0)
    ia, ta, ik, tk, ids, labels = features()
    out = obj.loss(ia, ta, ik, tk, ids, labels, step=0, rank=0, warmup=True)
    out.loss.backward()
    assert not obj.scaled and ia.grad is not None and ta.grad is not None
    obj.commit(out)
    assert obj.buffer is None  # it reads none, so it holds none


def test_only_objectives_with_a_warm_up_change_during_it():
    """fne runs VSE++ in its warm-up with the statistics kept; the others run as they are."""
    ia, ta, ik, tk, ids, labels = features()
    for name, warm_class in (("fne", VSEpp), ("vsepp", None), ("clip", None)):
        obj = objective(objective=name)
        assert (type(obj.warmup_objective) if obj.warmup_objective else None) is warm_class
        scale = torch.tensor([10.0]) if obj.scaled else None
        warm = obj.loss(ia, ta, ik, tk, ids, labels, step=0, rank=0, warmup=True, logit_scale=scale)
        assert (warm.stats is obj.stats) == (warm_class is not None)
    vsepp = objective(objective="vsepp").loss(ia, ta, ik, tk, ids, labels, step=0, rank=0, warmup=False)
    fne_warm = objective(objective="fne").loss(ia, ta, ik, tk, ids, labels, step=0, rank=0, warmup=True)
    assert torch.equal(vsepp.loss, fne_warm.loss)


def candidate_set(b, n, d, seed, n_ids=40):
    g = torch.Generator().manual_seed(seed)
    anchors = unit(b, d, generator=g).double().float()
    pos_keys, keys = unit(b, d, generator=g), unit(n, d, generator=g)
    ids = torch.arange(b)
    key_ids = torch.randint(0, n_ids, (n,), generator=g)
    key_ids[:b] = ids  # the global batch first: each anchor's own key is a positive, never a negative
    valid = torch.rand(n, generator=g) > 0.1
    cand = CandidateSet(keys, key_ids, torch.randint(-1, 5, (n,), generator=g), valid, ids,
                        torch.randint(0, 5, (b,), generator=g))
    return anchors, pos_keys, cand


@pytest.mark.parametrize("stats", [READY, NOT_READY], ids=["posterior", "not-ready"])
@pytest.mark.parametrize("b,n,d,tile", [(13, 301, 17, 37), (1, 5, 3, 2), (29, 130, 64, 1000)])
def test_streaming_posterior_infonce_matches_dense_reference(stats, b, n, d, tile):
    anchors, pos_keys, cand = candidate_set(b, n, d, seed=b)
    cfg = FNEConfig(prior_ratio=100.0)
    grad_out = torch.randn(b, generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (lambda a, s: posterior_infonce(a, s, pos_keys, cand, stats, cfg, tile_size=tile)[0],
               lambda a, s: dense_posterior_infonce(a, s, pos_keys, cand, stats, cfg)):
        a = anchors.clone().requires_grad_()
        scale = torch.tensor([1 / 0.07], requires_grad=True)
        rows = fn(a, scale)
        results.append((rows.detach(), *torch.autograd.grad((rows * grad_out).sum(), (a, scale))))
    (rows, grad_a, grad_s), (ref_rows, ref_a, ref_s) = results
    # fp32 throughout; the tolerances cover summation order over tiles (logits up to |1/0.07| = 14.3)
    torch.testing.assert_close(rows, ref_rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_a, ref_a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_s, ref_s, rtol=1e-4, atol=1e-5)


def test_posterior_infonce_by_hand():
    """Stats not ready: plain InfoNCE over the valid candidates of another id; then a candidate whose 1 - f is 0
    leaves the denominator."""
    anchors, pos_keys, cand = candidate_set(4, 9, 5, seed=0)
    t = 1 / 0.07
    rows, _ = posterior_infonce(anchors, torch.tensor(t), pos_keys, cand, NOT_READY, FNEConfig(prior_ratio=100.0))
    for i in range(4):
        p = t * (anchors[i] @ pos_keys[i])
        negs = [t * (anchors[i] @ cand.keys[j]) for j in range(9) if cand.valid[j] and cand.key_ids[j] != i]
        want = -p + torch.logsumexp(torch.stack([p, *negs]), 0)
        assert math.isclose(rows[i].item(), want.item(), rel_tol=1e-5)
    # a posterior that calls every candidate above 0.25 a false negative: those leave the denominator
    sharp = SimilarityStats.from_moments(count_pos=500, mean_pos=0.9, var_pos=1e-4, mean_neg=-0.5, var_neg=1e-4)
    tnp = true_negative_prob(anchors @ cand.keys.T, sharp, FNEConfig(prior_ratio=100.0))
    rows, _ = posterior_infonce(anchors, torch.tensor(t), pos_keys, cand, sharp, FNEConfig(prior_ratio=100.0))
    for i in range(4):
        p = t * (anchors[i] @ pos_keys[i])
        negs = [t * (anchors[i] @ cand.keys[j]) + tnp[i, j].log() for j in range(9)
                if cand.valid[j] and cand.key_ids[j] != i]
        want = -p + torch.logsumexp(torch.stack([p, *negs]), 0)
        assert math.isclose(rows[i].item(), want.item(), rel_tol=1e-5)


def test_posterior_infonce_false_negative_mass():
    """The softmax mass on labelled false negatives: candidates of the anchor's label and another id."""
    anchors, pos_keys, cand = candidate_set(6, 50, 8, seed=3)
    _, false_prob = posterior_infonce(anchors, torch.tensor(10.0), pos_keys, cand, NOT_READY, FNEConfig())
    logits = 10.0 * anchors @ cand.keys.T
    drop = (cand.anchor_ids[:, None] == cand.key_ids[None]) | ~cand.valid[None]
    full = torch.cat([10.0 * (anchors * pos_keys).sum(1, keepdim=True), logits.masked_fill(drop, -math.inf)], 1)
    prob = full.softmax(1)[:, 1:]
    false = ~drop & (cand.key_labels[None] >= 0) & (cand.key_labels[None] == cand.anchor_labels[:, None])
    torch.testing.assert_close(false_prob, (prob * false).sum(1))


def two_pairs(neg_sim: float):
    """Two pairs in 3-d: image i's own text has similarity 1; the other text has similarity `neg_sim`."""
    c = math.sqrt(1 - neg_sim**2)
    ia = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    # text 0 = image 0's direction; text 1 = neg_sim * image 0 + c * image 1 (so image 0 . text 1 = neg_sim)
    tk = torch.tensor([[1.0, 0.0, 0.0], [neg_sim, c, 0.0]])
    return ia, tk


def test_eliminate_rows_without_a_candidate_are_skipped_and_counted():
    # f >= 0.5 wherever s is near mu+ = 0.9: image 0's only candidate (text 1, s = 0.9) is eliminated, so image 0
    # gets no negative (never the fallback); image 1's candidate (text 0, s = 0.9 * 0 + ... = 0) survives
    obj = Objective(FNESection(objective="fne", mode="eliminate", cutdown="off", queue_size=8, impl="torch"),
                    dim=3, device=torch.device("cpu"), seed=0)
    obj.stats = SimilarityStats.from_moments(count_pos=500, mean_pos=0.9, var_pos=0.01, mean_neg=0.0, var_neg=0.01)
    obj.stats.updated = lambda *args: obj.stats  # keep the hand-set statistics for this step
    ia, tk = two_pairs(0.9)
    ta, ik = tk.clone().requires_grad_(), ia.detach().clone()
    ids, labels = torch.tensor([0, 1]), torch.tensor([5, 5])
    out = obj.loss(ia, ta, ik, tk, ids, labels, step=0, rank=0, warmup=False)
    sums = dict(zip(DIAGNOSTICS, out.diagnostics.tolist()))
    # image->text: row 0 eliminated; row 1 (image 1 vs text 0: s = 0) keeps its negative.  text->image: text 0 vs
    # image 1 (s = 0) kept; text 1 vs image 0 (s = 0.9) eliminated.
    assert sums["sampled_rows"] == 4 and sums["no_negative"] == 2 and sums["fallback"] == 0
    assert sums["labelled"] == 2 and sums["false_negatives"] == 2  # both kept picks share the label 5
    # the loss counts the skipped rows as 0 in the mean over b: rows with s_neg = 0 and s_pos = 1 have no violation
    assert out.loss.item() == 0.0
    assert summarise(sums)["no_negative_share"] == 0.5


def test_posterior_hinge_weights_each_hinge_by_the_drawn_candidates_true_negative_prob():
    cfg = dict(objective="fne", mode="hardness", cutdown="off", queue_size=8, impl="torch")
    stats = SimilarityStats.from_moments(count_pos=500, mean_pos=0.9, var_pos=0.01, mean_neg=0.0, var_neg=0.01)
    losses = {}
    for hinge in (False, True):
        obj = Objective(FNESection(**cfg, posterior_hinge=hinge), dim=3, device=torch.device("cpu"), seed=0)
        obj.stats = stats
        obj.stats.updated = lambda *args: stats
        ia, tk = two_pairs(0.85)
        ta, ik = tk.clone().requires_grad_(), ia.detach().clone()
        out = obj.loss(ia, ta, ik, tk, torch.arange(2), torch.tensor([0, 1]), step=0, rank=0, warmup=False)
        losses[hinge] = out.loss.item()
    # every row's only candidate is the other item: image 0 -> text 1 (s = 0.85, positive 1: hinge 0.05) and
    # text 1 -> image 0 (s = 0.85, positive c = text 1 . image 1: hinge 0.2 + 0.85 - c); the two rows against
    # similarity 0 have no violation.  Each direction is a mean over b = 2.
    c = math.sqrt(1 - 0.85**2)
    plain = (0.05 + (0.2 + 0.85 - c)) / 2
    one_minus_f = true_negative_prob(torch.tensor(0.85), stats, obj.rule).item()
    assert math.isclose(losses[False], plain, rel_tol=1e-5)
    assert math.isclose(losses[True], plain * one_minus_f, rel_tol=1e-5) and one_minus_f < 0.1


def test_objective_config_choices_and_prior_ratio_defaults():
    assert FNESection().rule().prior_ratio == 10000.0  # the released rule keeps the released prior
    for fne in (dict(mode="bayes"), dict(mode="eliminate"), dict(objective="posterior_infonce")):
        assert FNESection(**fne).rule().prior_ratio == 100.0
    assert FNESection(mode="bayes", prior_ratio=30.0).rule().prior_ratio == 30.0
    cfg = load_config("configs/demo.yaml", ["fne.objective=clip"])
    assert cfg.fne.objective == "clip"
    with pytest.raises(ConfigError, match="fne.objective"):
        load_config("configs/demo.yaml", ["fne.objective=simclr"])
    with pytest.raises(ConfigError, match="posterior_hinge"):
        load_config("configs/demo.yaml", ["fne.objective=clip", "fne.posterior_hinge=true"])


def test_at_risk_rows_are_those_with_a_false_negative_candidate():
    from fne_dist.buffer import Segment, false_candidate_counts, has_false_candidate

    g = torch.Generator().manual_seed(0)
    cand_ids = torch.randint(0, 60, (300,), generator=g)
    group_of = torch.randint(-1, 25, (60,), generator=g)  # an image id has one label (-1: unknown)
    valid = torch.rand(300, generator=g) > 0.3
    ids = torch.randint(0, 60, (40,), generator=g)  # repeated ids and labels among the anchors too
    keys = torch.zeros(300, 2)
    segments = [Segment(0, keys[:100], keys[:100], cand_ids[:100], group_of[cand_ids[:100]], None),  # all valid
                Segment(100, keys[100:], keys[100:], cand_ids[100:], group_of[cand_ids[100:]], valid[100:])]
    valid[:100] = True
    got = has_false_candidate(group_of[ids], false_candidate_counts(ids, group_of[ids], segments))
    want = [bool(group_of[i] >= 0 and any(valid[j] and group_of[cand_ids[j]] == group_of[i] and cand_ids[j] != i
                                          for j in range(300))) for i in ids.tolist()]
    assert got.tolist() == want and 0 < sum(want) < 40


def test_without_known_labels_no_anchor_is_at_risk_and_nothing_is_counted(monkeypatch):
    """Web pairs carry no labels: the CPU skips the count (a GPU counts, as reading a value would wait for it)."""
    from fne_dist import buffer as buffer_module
    from fne_dist.buffer import NegativeBuffer

    g = torch.Generator().manual_seed(1)
    buf = NegativeBuffer(256, 4, torch.float32, "cpu")
    ids = torch.arange(16)
    unlabelled = torch.full_like(ids, -1)
    buf.enqueue(GlobalKeys(torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g), ids, unlabelled))
    batch = GlobalKeys(torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g), ids + 16, unlabelled)
    monkeypatch.setattr(buffer_module, "host_reads_are_free", lambda device: False)
    counted = buf.at_risk(batch.ids, batch.labels, batch, row_offset=0)
    monkeypatch.setattr(buffer_module, "host_reads_are_free", lambda device: True)
    monkeypatch.setattr(buffer_module, "false_candidate_counts", lambda *a: pytest.fail("counted without labels"))
    assert torch.equal(buf.at_risk(batch.ids, batch.labels, batch, row_offset=0), counted) and not counted.any()
    labelled = GlobalKeys(batch.image, batch.text, batch.ids, batch.labels.clone().fill_(3))
    with pytest.raises(pytest.fail.Exception, match="counted"):
        buf.at_risk(labelled.ids, labelled.labels, labelled, row_offset=0)


def step_features(step: int, b=12, d=16):
    """Matching pairs (image, text near it) with labels in groups of three, ids unique across steps."""
    g = torch.Generator().manual_seed(step)
    ia = unit(b, d, generator=g)
    ta = F.normalize(ia + 0.5 * unit(b, d, generator=g), dim=-1)
    return ia.requires_grad_(), ta.requires_grad_(), torch.arange(b) + b * step, torch.arange(b) // 3 + 4 * step


@pytest.mark.parametrize("name", [*REGISTRY, "mean_cosine"])
def test_online_keys_are_the_online_features_detached(name, monkeypatch):
    """fne.keys=online gives, step by step, what momentum keys equal to the detached online features give: the same
    loss and gradients (bitwise), diagnostics, draws and enqueued keys, over a buffer filled by earlier steps (the
    statistics ready, so the posterior weighs); the keys enter the buffer without gradient.  mean_cosine (above)
    differentiates whatever keys it gets: there only the detaching keeps the gradients equal."""
    monkeypatch.setitem(REGISTRY, "mean_cosine", f"{__name__}:MeanCosine")
    fne = dict(objective=name, mode="bayes", min_count=4)
    online, momentum = objective(keys="online", **fne), objective(keys="momentum", **fne)
    for step in range(4):
        results = []
        for obj, keys in ((online, lambda ia, ta: (None, None)), (momentum, lambda ia, ta: (ia.detach(), ta.detach()))):
            ia, ta, ids, labels = step_features(step)
            scale = torch.tensor([1 / 0.07], requires_grad=True)
            out = obj.loss(ia, ta, *keys(ia, ta), ids, labels, step=step, rank=0, warmup=False,
                           logit_scale=scale if obj.scaled else None, epoch=1)  # clip_queue's memory term on
            inputs = (ia, ta, scale) if obj.scaled else (ia, ta)
            results.append((out, torch.autograd.grad(out.loss, inputs)))
            obj.commit(out)
        (got, got_grads), (want, want_grads) = results
        assert torch.equal(got.loss, want.loss) and torch.equal(got.diagnostics, want.diagnostics)
        assert all(torch.equal(g, w) for g, w in zip(got_grads, want_grads))
        assert (got.index is None and want.index is None) or torch.equal(got.index, want.index)
        assert torch.equal(got.keys.image, want.keys.image) and torch.equal(got.keys.text, want.keys.text)
        assert not got.keys.image.requires_grad and not got.keys.text.requires_grad
    assert float(online.stats.count_pos) >= 4  # the rule was on for the last steps
    if online.buffer is None:  # an objective that reads no buffer holds none
        assert momentum.buffer is None and not objective_class(name).reads_buffer
        return
    assert torch.equal(online.buffer.queue.valid, momentum.buffer.queue.valid)
    assert not online.buffer.queue.image.requires_grad and torch.equal(online.buffer.queue.text,
                                                                       momentum.buffer.queue.text)


def test_keys_must_match_fne_keys():
    ia, ta, ik, tk, ids, labels = features()
    with pytest.raises(ValueError, match=r"fne\.keys='online': pass ik=tk=None"):
        objective(keys="online").loss(ia, ta, ik, tk, ids, labels, step=0, rank=0, warmup=False)
    with pytest.raises(ValueError, match=r"fne\.keys='momentum' with fne\.objective='fne': pass the momentum"):
        objective().loss(ia, ta, None, None, ids, labels, step=0, rank=0, warmup=False)
    with pytest.raises(ConfigError, match=r"fne\.keys='ema' is unknown: use one of \('momentum', 'online'\)"):
        load_config("configs/demo.yaml", ["fne.keys=ema"])


READS = {  # objective: (reads the keys, reads the buffer, uses the posterior under FNESection's defaults)
    "fne": (True, True, True), "vsepp": (False, False, False), "clip": (False, False, False),
    "posterior_infonce": (True, True, True), "clip_queue": (True, True, True), "soft_clip": (True, False, True)}


def test_every_objective_declares_what_it_reads():
    """What each objective reads decides what is built for it: no buffer for one that reads none, no momentum keys
    for one that reads only ids, and the posterior's log lines only for one that uses it."""
    assert set(READS) == set(REGISTRY)
    for name, (keys, buffer, posterior) in READS.items():
        cfg = FNESection(objective=name)
        cls = objective_class(name)
        assert (cls.reads_keys, cls.reads_buffer, uses_posterior(cfg)) == (keys, buffer, posterior), name
        assert momentum_keys(cfg) == keys and not momentum_keys(replace(cfg, keys="online"))
        assert (objective(objective=name).buffer is not None) == buffer
        lines = " ".join(unused_settings(cfg))
        assert ("reads no negative buffer" in lines) == (not buffer) and ("no momentum towers" in lines) == (not keys)
    assert not uses_posterior(FNESection(objective="fne", mode="hardness"))
    assert uses_posterior(FNESection(objective="fne", mode="hardness", posterior_hinge=True))
    assert not uses_posterior(FNESection(objective="soft_clip", soft_teacher="uniform"))


@pytest.mark.parametrize("name", ["clip", "vsepp"])
def test_an_objective_without_keys_ignores_momentum_keys(name):
    """clip and vsepp read only ids: under fne.keys=momentum they take no keys (the trainer runs no momentum
    towers), keys given anyway change nothing, and the step gathers the global batch's ids and labels but no
    features."""
    ia, ta, ik, tk, ids, labels = features()
    scale = torch.tensor([10.0])
    obj = objective(objective=name)
    given, none = (obj.loss(ia, ta, k, k, ids, labels, step=0, rank=0, warmup=False, logit_scale=scale)
                   for k in (ik, None))
    assert torch.equal(given.loss, none.loss)
    assert given.keys.image.shape == given.keys.text.shape == (len(ids), 0)
    assert torch.equal(given.keys.ids, ids) and torch.equal(given.keys.labels, labels)
    obj.commit(given)  # no buffer to enqueue into


def test_soft_clip_reports_its_posterior_and_not_a_buffer():
    """soft_clip weighs by the posterior, so the log warns while it is off and says when it switches on (and, before
    the posterior was a declared part of each objective, it said neither); it has no buffer to report full."""
    obj = objective(objective="soft_clip", min_count=4)
    assert "the posterior is still off" in obj.posterior_off()
    obj.stats = SimilarityStats.from_moments(count_pos=10, mean_pos=0.6, var_pos=0.01, mean_neg=0.3, var_neg=0.02,
                                             reset="never")
    assert obj.posterior_off() is None and obj.news() == ["the posterior is on: 10 positives counted, more than "
                                                          "fne.min_count=4"]
    short = sizing_advice(FNESection(objective="soft_clip", queue_size=8192, min_count=10**6), epoch_pairs=1000,
                          global_batch=100, total_steps=20)
    assert len(short) == 1 and "fne.min_count=1000000 cannot be reached" in short[0]  # nothing about the queue


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (host syncs are a GPU matter)")
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_gpu_fne_step_waits_for_nothing(impl):
    """Objective.loss (gather, statistics, both draws, diagnostics, loss) and commit (statistics, enqueue) never
    wait for the GPU: the trainer's one host sync per step is its finite-and-stop flag (train.py), not here."""
    device = torch.device("cuda")
    obj = Objective(FNESection(queue_size=4096, impl=impl, mode="bayes", cutdown="off", min_count=10), dim=64,
                    device=device, seed=0)
    g = torch.Generator().manual_seed(0)
    for step in range(4):  # the first steps fill the queue, make the statistics ready and compile the kernels
        ia = unit(256, 64, generator=g)
        ta, ik, tk = (F.normalize(ia + 0.3 * unit(256, 64, generator=g), dim=-1) for _ in range(3))  # matching pairs
        ia, ta, ik, tk = (x.to(device) for x in (ia, ta, ik, tk))
        ids = torch.arange(step * 256, (step + 1) * 256, device=device)
        labels = ids % 50  # known labels: the at-risk count runs too
        with torch.cuda.device(device):
            torch.cuda.set_sync_debug_mode("error" if step == 3 else "default")
            try:
                out = obj.loss(ia.requires_grad_(), ta.requires_grad_(), ik, tk, ids, labels, step=step, rank=0,
                               warmup=False)
                obj.commit(out)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    sums = dict(zip(DIAGNOSTICS, out.diagnostics.tolist()))
    assert torch.isfinite(out.loss) and bool(obj.stats.ready(10)) and sums["fallback"] < sums["sampled_rows"] == 512


def test_compiled_infonce_tile_steps_match_the_eager_ones(monkeypatch):
    """Large CPU tiles run the forward and backward tile steps through torch.compile (fne_dist.sampler.compiled_step):
    the same losses and gradients as eager, to float rounding."""
    from fne_dist import sampler

    anchors, pos_keys, cand = candidate_set(16, 200, 12, seed=4)

    def run():
        a = anchors.clone().requires_grad_()
        scale = torch.tensor([1 / 0.07], requires_grad=True)
        rows, false_prob = posterior_infonce(a, scale, pos_keys, cand, READY, FNEConfig(prior_ratio=100.0),
                                             tile_size=64, impl="torch")
        return (rows.detach(), false_prob, *torch.autograd.grad(rows.sum(), (a, scale)))

    eager = run()
    monkeypatch.setattr(sampler, "COMPILE_MIN_ELEMENTS", 0)
    compiled = run()
    for name in ("infonce_forward", "infonce_backward"):
        assert sampler._COMPILED[name] is not None, f"compiling {name} failed: the eager step ran instead"
    for x, y in zip(compiled, eager):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
