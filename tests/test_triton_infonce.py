"""The fused posterior-weighted InfoNCE (kernels/fne_infonce.py) against the torch streaming path and the dense
autograd reference (fne_dist.infonce): the kernels' partials of one candidate run against the torch tiles' partials,
the loss with impl="triton" over one run and over several (the replicated buffer's batch and queue segments)
against impl="torch", and the quadratic log-odds against `true_negative_prob`.  (Sharded over gloo ranks with
impl="triton": tests/test_sharded_infonce.py.)

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py) with blocks of 64
anchors x 128 candidates, so the shapes below are not multiples of the blocks and N spans several candidate splits.
Tolerances, fp32: losses rtol 1e-5 / atol 1e-5, gradients rtol 1e-4 / atol 1e-5 (other summation orders over tiles
and splits, log2/exp2 instead of log/exp; logits up to 1/0.07 = 14.3), as the torch path against the dense one.
fp16 operands: the product rounds the anchors to fp16 (the torch path keeps them fp32): rtol 1e-3.  bf16 is wrong
in the interpreter: tested on a GPU only.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fne_dist.infonce import (CandidateSet, Candidates, combine_partials, dense_posterior_infonce, lse_partials,
                             posterior_infonce, pull_partials, streamed_posterior_infonce)
from fne_dist.stats import SimilarityStats
from fne_dist.weights import FNEConfig, log_odds_coefficients, true_negative_prob

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
READY = SimilarityStats.from_moments(count_pos=500, mean_pos=0.5, var_pos=0.01, mean_neg=0.05, var_neg=0.02)
SHARP = SimilarityStats.from_moments(count_pos=500, mean_pos=0.9, var_pos=1e-4, mean_neg=-0.5, var_neg=1e-4)
NOT_READY = SimilarityStats.from_moments(count_pos=50, mean_pos=0.5, var_pos=0.01, mean_neg=0.05, var_neg=0.02)
CFG = FNEConfig(prior_ratio=100.0)


def problem(b, n, d, seed=0, n_ids=40, dtype=torch.float32):
    """Keys pulled towards random anchors (similarities over about [-0.5, 1], so 1 - f spans (0, 1]), the global
    batch first (each anchor's own key is excluded), 10% invalid slots, labels with some false negatives."""
    g = torch.Generator().manual_seed(seed)
    anchors = F.normalize(torch.randn(b, d, generator=g), dim=1)
    pos_keys = F.normalize(anchors + 0.5 * torch.randn(b, d, generator=g) / d**0.5, dim=1)
    pull = 3.0 * torch.rand(n, 1, generator=g) ** 2
    keys = F.normalize(torch.randn(n, d, generator=g) / d**0.5 + pull * anchors[torch.randint(0, b, (n,), generator=g)],
                       dim=1)
    ids = torch.arange(b)
    key_ids = torch.randint(b, b + n_ids, (n,), generator=g)
    key_ids[:min(b, n)] = ids[:n]
    valid = torch.rand(n, generator=g) > 0.1
    cand = CandidateSet(keys.to(DEVICE, dtype), key_ids.to(DEVICE), torch.randint(-1, 5, (n,), generator=g).to(DEVICE),
                        valid.to(DEVICE), ids.to(DEVICE), torch.randint(0, 5, (b,), generator=g).to(DEVICE))
    return anchors.to(DEVICE, dtype), pos_keys.to(DEVICE, dtype), cand


def run(impl, anchors, pos_keys, cand, stats, scale=1 / 0.07, seed=1):
    """(losses, false-negative mass, grad anchors, grad scale) under a random upstream gradient."""
    a = anchors.clone().requires_grad_()
    t = torch.tensor([scale], device=anchors.device, requires_grad=True)
    if impl == "dense":
        rows, false_prob = dense_posterior_infonce(a, t, pos_keys, cand, stats, CFG), None
    else:
        rows, false_prob = posterior_infonce(a, t, pos_keys, cand, stats, CFG, impl=impl)
    grad_out = torch.randn(len(a), generator=torch.Generator().manual_seed(seed)).to(a.device)
    grad_a, grad_t = torch.autograd.grad((rows * grad_out).sum(), (a, t))
    return rows.detach(), false_prob, grad_a, grad_t


def assert_matches(tri, ref, rtol_rows=1e-5, rtol_grad=1e-4, atol=1e-5):
    rows, false_prob, grad_a, grad_t = tri
    torch.testing.assert_close(rows, ref[0], rtol=rtol_rows, atol=atol)
    if ref[1] is not None:
        torch.testing.assert_close(false_prob, ref[1], rtol=rtol_rows, atol=atol)
    torch.testing.assert_close(grad_a.float(), ref[2].float(), rtol=rtol_grad, atol=atol)
    torch.testing.assert_close(grad_t, ref[3], rtol=rtol_grad, atol=atol)


@pytest.mark.parametrize("stats", [READY, SHARP, NOT_READY])
def test_quadratic_log_odds_is_the_posterior(stats):
    """sigmoid(-((a d + b) d + c)), d = s - mu+, is `true_negative_prob` (the densities' form) over all of [-1, 1]
    in fp32, to 1e-6 plus what moving s by one fp32 ulp changes: where the posterior is steep (SHARP: 1 - f falls from
    1 to 0 within 1e-3 of s) both forms round the large terms of the log-odds differently."""
    s = torch.linspace(-1, 1, 4001)
    mean_pos, a, b, c = log_odds_coefficients(stats, CFG, "cpu")
    d = s - mean_pos
    quadratic = torch.sigmoid(-((a * d + b) * d + c))
    keep = true_negative_prob(s, stats, CFG)
    slope = keep * (1 - keep) * (2 * a * d + b).abs()  # |d(1 - f)/ds|
    ulp = 2**-23 * torch.maximum(s.abs(), mean_pos.abs())
    assert ((quadratic - keep).abs() <= 1e-6 + slope * ulp).all()
    # and -softplus of it is log(1 - f), finite where 1 - f underflows
    log_keep = -F.softplus((a * d + b) * d + c)
    assert torch.isfinite(log_keep).all()
    torch.testing.assert_close(log_keep[keep > 1e-30], quadratic[keep > 1e-30].log(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stats", [READY, SHARP, NOT_READY], ids=["posterior", "sharp", "not-ready"])
@pytest.mark.parametrize("b,n,d", [(37, 301, 17), (1, 5, 3), (70, 400, 48), (5, 129, 64)])
def test_fused_infonce_matches_torch_and_dense(stats, b, n, d):
    anchors, pos_keys, cand = problem(b, n, d, seed=b)
    tri = run("triton", anchors, pos_keys, cand, stats)
    assert_matches(tri, run("torch", anchors, pos_keys, cand, stats))
    assert_matches(tri, run("dense", anchors, pos_keys, cand, stats))


def test_rows_and_splits_without_candidates():
    """A row whose candidates are all its own id or invalid (its loss is 0, gradient 0), and whole candidate tiles
    of invalid slots (a split with nothing to add): no NaN, same as the torch path."""
    anchors, pos_keys, cand = problem(9, 300, 20, seed=5)
    cand.key_ids[::2] = 0  # row 0's own id on every other column ...
    cand.valid[1::2] = False  # ... and the rest invalid
    cand.valid[128:256] = False  # a whole kernel tile
    tri = run("triton", anchors, pos_keys, cand, READY)
    assert torch.isfinite(tri[0]).all() and torch.isfinite(tri[2]).all()
    assert tri[0][0] == 0 and tri[1][0] == 0 and (tri[2][0] == 0).all()
    assert_matches(tri, run("torch", anchors, pos_keys, cand, READY))
    cand.valid[:] = False  # no candidate at all: every loss 0
    tri = run("triton", anchors, pos_keys, cand, READY)
    assert (tri[0] == 0).all() and (tri[2] == 0).all() and tri[3] == 0


def test_wide_features_span_two_output_chunks():
    """D=300: the interpreter's backward accumulates 256 output columns per program, so two feature chunks (and a
    partial one) write the anchors' gradient; only the first writes the logit scale's sum."""
    anchors, pos_keys, cand = problem(9, 200, 300, seed=8)
    assert_matches(run("triton", anchors, pos_keys, cand, READY), run("torch", anchors, pos_keys, cand, READY))


def test_large_scale_and_sharp_posterior():
    """t = 100 (logits up to 100) with log(1 - f) down to about -10^4: the online max keeps every sum finite."""
    anchors, pos_keys, cand = problem(21, 257, 32, seed=7)
    tri = run("triton", anchors, pos_keys, cand, SHARP, scale=100.0)
    assert_matches(tri, run("torch", anchors, pos_keys, cand, SHARP, scale=100.0), rtol_grad=2e-4)


def partials_of_both(anchors, pos_keys, cand, stats, scale=14.0):
    """One run's forward partials [n, 3] and backward partials [n, D + 1] from the kernels and from the torch tiles
    (tiles of 50 candidates), the backward at the torch path's log-sum-exp."""
    from fne_kernels.fne_infonce import triton_lse_partials, triton_pull_partials

    run = Candidates(cand.keys, cand.key_ids, cand.key_labels, cand.valid)
    a, t = anchors.float(), torch.tensor([scale], device=anchors.device)
    coefficients = log_odds_coefficients(stats, CFG, anchors.device)
    ids, labels = cand.anchor_ids, cand.anchor_labels
    torch_lse = lse_partials(a, t, [run], ids, labels, coefficients, tile=50)
    lse, _ = combine_partials((a * pos_keys.float()).sum(1) * t, torch_lse[None])
    return ((triton_lse_partials(a, t, run, ids, labels, coefficients), torch_lse),
            (triton_pull_partials(a, t, lse, run, ids, coefficients), pull_partials(a, t, lse, [run], ids, coefficients,
                                                                                    tile=50)))


def normalised(partials):
    """(log-sum-exp over the run, false-negative share of it) per row: the kernel's max is the largest logit, the
    torch tiles' a bound within log 2 of it, so the sums differ by that factor and these do not."""
    m, total, false_mass = partials.unbind(1)
    return m + total.log(), false_mass / total


@pytest.mark.parametrize("b,n,d,stats", [(37, 301, 17, READY), (1, 5, 3, READY), (70, 400, 48, SHARP),
                                         (5, 129, 64, NOT_READY)])
def test_kernel_partials_are_the_torch_tiles_partials(b, n, d, stats):
    """The kernels as a provider of `lse_partials` / `pull_partials` for one run (odd shapes, several kernel tiles
    and splits, masked slots): the forward partials in natural-log units give the torch tiles' log-sum-exp and
    false-negative share (rtol 1e-5: log2/exp2, other summation orders), the backward partials their sums (rtol 1e-4,
    atol 1e-5, as the gradients)."""
    anchors, pos_keys, cand = problem(b, n, d, seed=b)
    (tri_lse, ref_lse), (tri_pull, ref_pull) = partials_of_both(anchors, pos_keys, cand, stats)
    assert tri_lse.shape == (b, 3) and tri_pull.shape == (b, d + 1)
    for got, want in zip(normalised(tri_lse), normalised(ref_lse)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tri_pull, ref_pull, rtol=1e-4, atol=1e-5)


def test_kernel_partials_of_rows_and_runs_without_candidates():
    """A row whose candidates are all its own id or invalid gets the neutral partials (-inf, 0, 0) and a zero pull,
    as from the torch tiles; an empty run gives them to every row without a launch."""
    anchors, pos_keys, cand = problem(9, 300, 20, seed=5)
    cand.key_ids[::2] = 0  # row 0's own id on every other column ...
    cand.valid[1::2] = False  # ... and the rest invalid
    (tri_lse, ref_lse), (tri_pull, ref_pull) = partials_of_both(anchors, pos_keys, cand, READY)
    neutral = torch.tensor([float("-inf"), 0.0, 0.0], device=anchors.device)
    assert torch.equal(tri_lse[0], neutral) and torch.equal(ref_lse[0], neutral) and (tri_pull[0] == 0).all()
    torch.testing.assert_close(normalised(tri_lse[1:])[0], normalised(ref_lse[1:])[0], rtol=1e-5, atol=1e-6)
    empty = CandidateSet(cand.keys[:0], cand.key_ids[:0], cand.key_labels[:0], cand.valid[:0], cand.anchor_ids,
                         cand.anchor_labels)
    (tri_lse, _), (tri_pull, _) = partials_of_both(anchors, pos_keys, empty, READY)
    assert torch.equal(tri_lse, neutral.expand(9, 3)) and not tri_pull.any()


def test_splits_do_not_change_the_partials():
    """One program over all candidates, or one tile per program: the same partials up to rounding (the forward's
    splits merged exactly in base 2, the backward's summed)."""
    from fne_kernels.fne_infonce import triton_lse_partials, triton_pull_partials

    anchors, _, cand = problem(11, 700, 24, seed=2)
    run = Candidates(cand.keys, cand.key_ids, cand.key_labels, cand.valid)
    t = torch.tensor(14.0, device=anchors.device)
    coefficients = log_odds_coefficients(READY, CFG, anchors.device)
    results = []
    for programs in (1, 64):
        forward = triton_lse_partials(anchors, t, run, cand.anchor_ids, cand.anchor_labels, coefficients, programs)
        lse = forward[:, 0] + forward[:, 1].log()
        results.append((forward, triton_pull_partials(anchors, t, lse, run, cand.anchor_ids, coefficients, programs)))
    (one_fwd, one_pull), (many_fwd, many_pull) = results
    torch.testing.assert_close(one_fwd[:, 0], many_fwd[:, 0], rtol=0, atol=0)  # the largest logit, in any order
    torch.testing.assert_close(one_fwd, many_fwd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one_pull, many_pull, rtol=1e-5, atol=1e-6)


def test_fp16_operands():
    anchors, pos_keys, cand = problem(19, 260, 40, seed=4, dtype=torch.float16)
    tri = run("triton", anchors, pos_keys, cand, READY)
    ref = run("torch", anchors, pos_keys, cand, READY)  # fp32 products of the fp16 values
    assert tri[2].dtype == torch.float16
    assert_matches(tri, ref, rtol_rows=1e-3, rtol_grad=1e-2, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="bf16 arithmetic is wrong in Triton's interpreter: needs a CUDA GPU")
def test_bf16_operands_on_gpu():
    """bf16 products (8 bits of mantissa, P rounded to bf16 in the second dot) against the fp32 torch path on the
    same bf16 values: 2e-2 relative."""
    anchors, pos_keys, cand = problem(300, 5000, 512, seed=6, dtype=torch.bfloat16)
    tri = run("triton", anchors, pos_keys, cand, READY)
    ref = run("torch", anchors, pos_keys, cand, READY)
    assert_matches(tri, ref, rtol_rows=2e-2, rtol_grad=5e-2, atol=2e-2)


def test_dispatch():
    """auto: triton on CUDA tensors, torch otherwise (bit-identical to the impl it picks); unknown impls refused."""
    anchors, pos_keys, cand = problem(6, 50, 8, seed=3)
    auto = posterior_infonce(anchors, torch.tensor(10.0, device=anchors.device), pos_keys, cand, READY, CFG)
    want = "triton" if CUDA else "torch"
    same = posterior_infonce(anchors, torch.tensor(10.0, device=anchors.device), pos_keys, cand, READY, CFG, impl=want)
    assert all(torch.equal(x, y) for x, y in zip(auto, same))
    with pytest.raises(ValueError, match="impl='fast' is unknown"):
        posterior_infonce(anchors, torch.tensor(10.0), pos_keys, cand, READY, CFG, impl="fast")
    assert math.isfinite(float(auto[0].sum()))


def test_several_runs_triton_equals_torch():
    """`streamed_posterior_infonce` (the buffer's InfoNCE) over several runs: a batch-like run without a validity
    mask (valid=None), a ring-like run with invalid slots, an empty run and a run of one tile: impl="triton" (each
    run's partials from the kernels, merged) gives the torch tiles' losses, false-negative mass and gradients of the
    anchors and the logit scale (the tolerances of the one-run tests), and both equal the dense reference over the
    joined candidates."""
    anchors, pos_keys, cand = problem(13, 330, 20, seed=9)
    keys, ids, labels, valid = cand.keys, cand.key_ids, cand.key_labels, cand.valid
    valid[:130] = True
    runs = [Candidates(keys[:130], ids[:130], labels[:130], None), Candidates(keys[130:130], ids[130:130],
            labels[130:130], valid[130:130]), Candidates(keys[130:300], ids[130:300], labels[130:300], valid[130:300]),
            Candidates(keys[300:], ids[300:], labels[300:], valid[300:])]

    def losses(impl):
        a = anchors.clone().requires_grad_()
        t = torch.tensor([14.0], device=a.device, requires_grad=True)
        rows, false_prob = streamed_posterior_infonce(a, t, pos_keys, runs, cand.anchor_ids, cand.anchor_labels,
                                                      READY, CFG, impl=impl)
        grad_out = torch.randn(len(a), generator=torch.Generator().manual_seed(3)).to(a.device)
        return (rows.detach(), false_prob, *torch.autograd.grad((rows * grad_out).sum(), (a, t)))

    fused = losses("triton")
    assert_matches(fused, losses("torch"))
    assert_matches(fused, run("dense", anchors, pos_keys, cand, READY, scale=14.0, seed=3))


def test_kernels_compile_for_hopper_without_spills(tmp_path):
    """Both kernels compiled for sm_90 (Triton's bundled ptxas, no GPU needed) at the shipped bf16 configs: on the
    tensor cores, no register spills, and 3 MUFU per candidate (exp2 and log2 of the softplus, exp2 of the sum)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "fne_kernels.compile_check", "--kernel", "infonce", "--dtype", "bf16"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 kernels compiled for sm_90, 0 spill registers" in out.stdout, out.stdout
    header = out.stdout.splitlines()[0].split()
    rows = {row["kernel"]: row for row in (dict(zip(header, line.split())) for line in out.stdout.splitlines()[1:-1])}
    assert rows["infonce-fwd"]["mma"] == rows["infonce-bwd"]["mma"] == "wgmma"
    assert all(row["spills"] == "0" for row in rows.values()), rows
    for name, per_thread in (("infonce-fwd", 128 * 128 // 256), ("infonce-bwd", 64 * 64 // 256)):
        assert 3 * per_thread <= int(rows[name]["mufu"]) < 4 * per_thread, rows[name]
