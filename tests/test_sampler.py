"""sample_negatives: support, fallback, the law of the draw (chi-square), reproducibility, rng agreement."""
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

from fne_dist import rng
from fne_dist.fne import (NO_NEGATIVE, SAMPLE_BLOCK, FNEConfig, KeyPart, SimilarityStats, fne_weights, merge_samples,
                          sample_negatives, sample_parts)
from fne_dist.weights import fallback_scores

IMPLS = ["dense", "torch"]
STATS = SimilarityStats.from_moments(count_pos=500, mean_pos=0.2, var_pos=0.01, mean_neg=0.0, var_neg=0.02)


def problem(b=37, n=1000, d=48, seed=0, n_ids=200):
    g = torch.Generator().manual_seed(seed)
    anchors = F.normalize(torch.randn(b, d, generator=g), dim=1)
    keys = F.normalize(torch.randn(n, d, generator=g), dim=1)
    pos_sims = 0.3 + 0.4 * torch.rand(b, generator=g)
    anchor_ids = torch.randint(0, n_ids, (b,), generator=g)
    key_ids = torch.randint(0, n_ids, (n,), generator=g)
    valid = torch.rand(n, generator=g) > 0.2
    return anchors, keys, pos_sims, anchor_ids, key_ids, valid


def dense_weights(anchors, keys, pos_sims, anchor_ids, key_ids, valid, cfg, stats=STATS):
    sims = anchors @ keys.T
    mask = anchor_ids[:, None] == key_ids[None, :]
    return fne_weights(sims, pos_sims, mask, stats, cfg, valid), fallback_scores(sims, mask, valid)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["official", "bayes"])
@pytest.mark.parametrize("cutdown", ["global", "anchor"])
def test_draws_only_positive_weights_else_hardest_violator(impl, mode, cutdown):
    cfg = FNEConfig(mode=mode, cutdown=cutdown)
    args = problem()
    w, scores = dense_weights(*args, cfg)
    anchors, keys, pos_sims, anchor_ids, key_ids, valid = args
    res = sample_negatives(anchors, keys, pos_sims, anchor_ids, key_ids, STATS, cfg, seed=3, valid=valid, impl=impl)
    rows = torch.arange(len(anchors))
    assert torch.equal(res.fallback, w.sum(1) == 0)
    assert (w[rows[~res.fallback], res.index[~res.fallback]] > 0).all()
    assert torch.equal(res.index[res.fallback], scores.argmax(1)[res.fallback])
    assert valid[res.index].all()
    assert torch.equal(res.survivors, (w > 0).sum(1))
    assert torch.allclose(res.weight_sum, w.sum(1), rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_zero_rows_fall_back_to_hardest_violator(impl):
    anchors, keys, pos_sims, anchor_ids, key_ids, valid = problem(b=5, n=64)
    cfg = FNEConfig(cutdown="anchor", margin=0.2)
    high = torch.full_like(pos_sims, 5.0)  # every candidate is below p - margin: all weights cut
    res = sample_negatives(anchors, keys, high, anchor_ids, key_ids, STATS, cfg, valid=valid, impl=impl)
    sims = (anchors @ keys.T).masked_fill(~valid | (anchor_ids[:, None] == key_ids[None, :]), -9)
    assert res.fallback.all()
    assert torch.equal(res.index, sims.argmax(1))  # no candidate violates the margin: the hardest negative


@pytest.mark.parametrize("impl", IMPLS)
def test_fallback_takes_the_largest_violation(impl):
    anchors, keys, pos_sims, anchor_ids, key_ids, valid = problem(b=6, n=80)
    stats = SimilarityStats.from_moments(count_pos=500, mean_pos=0.9, var_pos=0.01, mean_neg=0.0, var_neg=0.02)
    low = torch.full_like(pos_sims, 0.1)  # violators: s > -0.1; all cut by the global cut-down at s <= 0.7
    res = sample_negatives(anchors, keys, low, anchor_ids, key_ids, stats, FNEConfig(), valid=valid, impl=impl)
    cost = (0.2 + anchors @ keys.T - 0.1).clamp_min(0)
    cost = cost.masked_fill(~valid | (anchor_ids[:, None] == key_ids[None, :]), -1)
    assert res.fallback.all() and (cost.max(1).values > 0).all()
    assert torch.equal(res.index, cost.argmax(1))


def law_problem(b=4000):
    """One anchor repeated b times (each row has its own random numbers) against 12 candidates."""
    torch.manual_seed(0)
    d = 16
    anchor = F.normalize(torch.randn(1, d), dim=1)
    keys = F.normalize(torch.randn(12, d) + 1.5 * anchor, dim=1)
    sims = (anchor @ keys.T)[0]
    return anchor.expand(b, d).contiguous(), keys, torch.full((b,), sims.max().item() + 0.1)


def assert_law(index, w):
    """Chi-square goodness of fit of the drawn columns to w / sum(w)."""
    counts = torch.bincount(index, minlength=len(w)).double()
    w = w.double()  # normalise in float64: scipy checks that observed and expected sums agree to ~1e-8
    expected = w / w.sum() * len(index)
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a zero-weight candidate was drawn"
    pvalue = chisquare(counts[keep].numpy(), expected[keep].numpy()).pvalue
    assert pvalue > 1e-4, f"draws do not follow w / sum(w) (chi-square p = {pvalue:.2e})"


@pytest.mark.parametrize("impl", IMPLS)
def test_empirical_law_matches_weights(impl):
    anchors, keys, pos_sims = law_problem()
    cfg = FNEConfig(cutdown="off")
    ids_a, ids_k = torch.full((len(anchors),), -7), torch.arange(len(keys))
    res = sample_negatives(anchors, keys, pos_sims, ids_a, ids_k, STATS, cfg, seed=11, impl=impl, tile_size=5)
    w = fne_weights(anchors[:1] @ keys.T, pos_sims[:1], torch.zeros(1, len(keys), dtype=torch.bool), STATS, cfg)[0]
    assert (w > 0).sum() >= 8, "the law test needs a spread of weights"
    assert_law(res.index, w)


def test_chi_square_rejects_a_sampler_drawing_proportional_to_w_squared():
    anchors, keys, pos_sims = law_problem()
    cfg = FNEConfig(cutdown="off")
    w = fne_weights(anchors @ keys.T, pos_sims, torch.zeros(len(anchors), len(keys), dtype=torch.bool), STATS, cfg)
    u = rng.block_uniforms(rng.stream_key(11), torch.arange(len(anchors)), torch.arange(len(keys)))[0]
    wrong = (-torch.log(u) / w**2).argmin(1)
    with pytest.raises(AssertionError, match="do not follow"):
        assert_law(wrong, w[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_same_seed_same_indices_other_seed_differs(impl):
    anchors, keys, pos_sims, anchor_ids, key_ids, valid = problem()
    run = lambda **kw: sample_negatives(anchors, keys, pos_sims, anchor_ids, key_ids, STATS, FNEConfig(),  # noqa: E731
                                        valid=valid, impl=impl, **kw).index
    assert torch.equal(run(seed=5), run(seed=5))
    assert not torch.equal(run(seed=5), run(seed=6))
    assert not torch.equal(run(seed=5, step=0), run(seed=5, step=1))
    assert not torch.equal(run(seed=5, direction=0), run(seed=5, direction=1))


@pytest.mark.parametrize("tile", [1, 7, 333, 1000, 4096])
def test_streaming_draw_does_not_depend_on_tile_size(tile):
    anchors, keys, pos_sims, anchor_ids, key_ids, valid = problem()
    run = lambda t: sample_negatives(anchors, keys, pos_sims, anchor_ids, key_ids, STATS, FNEConfig(),  # noqa: E731
                                     seed=9, valid=valid, impl="torch", tile_size=t)
    ref, got = run(None), run(tile)
    assert torch.equal(ref.index, got.index) and torch.equal(ref.fallback, got.fallback)


def test_streaming_draw_does_not_depend_on_how_anchors_are_split_across_ranks():
    anchors, keys, pos_sims, anchor_ids, key_ids, valid = problem(b=40)
    whole = sample_negatives(anchors, keys, pos_sims, anchor_ids, key_ids, STATS, FNEConfig(), seed=2, valid=valid,
                             impl="torch").index
    halves = [sample_negatives(anchors[r * 20:(r + 1) * 20], keys, pos_sims[r * 20:(r + 1) * 20],
                               anchor_ids[r * 20:(r + 1) * 20], key_ids, STATS, FNEConfig(), seed=2, valid=valid,
                               impl="torch", row_offset=r * 20).index for r in range(2)]
    assert torch.equal(whole, torch.cat(halves))


def test_rng_matches_python_reference_and_is_uniform():
    rows, cols = torch.tensor([0, 1, 12345, 2**31 - 1, 2**32 - 1]), torch.tensor([0, 128, 2**20, 2**31, 2**32 - 128])
    stream = rng.stream_key(123, 4, 1)
    key1, key2 = stream, rng.mix64_int(stream ^ rng.GOLDEN64)
    race, pick = rng.block_uniforms(stream, rows, cols)
    for i, r in enumerate(rows.tolist()):
        for j, c in enumerate(cols.tolist()):
            bits = rng.mix64_int(rng.mix64_int(((r << 32) | c) ^ key1) ^ key2)
            assert race[i, j].item() == ((bits >> 41) + 0.5) / 2**23
            assert pick[i, j].item() == (((bits >> 9) & (2**23 - 1)) + 0.5) / 2**23
    race, pick = rng.block_uniforms(stream, torch.arange(300), torch.arange(0, 300 * 128, 128))
    for u in (race.flatten(), pick.flatten()):
        assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005
    assert abs(torch.corrcoef(torch.stack([race.flatten(), pick.flatten()]))[0, 1].item()) < 0.01


def test_streams_of_one_seed_never_collide():
    """stream_key is injective in (step, direction) for a seed: 64-bit streams, no birthday bound within a run."""
    streams = {rng.stream_key(7, step, direction) for step in range(20000) for direction in (0, 1)}
    assert len(streams) == 40000
    assert rng.stream_key(7, 10**7, 1) != rng.stream_key(7, 10**7, 0) != rng.stream_key(8, 10**7, 0)


def test_rejects_unknown_impl_and_width_mismatch():
    anchors, keys, pos_sims, anchor_ids, key_ids, _ = problem(b=3, n=10)
    with pytest.raises(ValueError, match="impl"):
        sample_negatives(anchors, keys, pos_sims, anchor_ids, key_ids, STATS, FNEConfig(), impl="cuda")
    with pytest.raises(ValueError, match="share D"):
        sample_negatives(anchors, keys[:, :5], pos_sims, anchor_ids, key_ids, STATS, FNEConfig())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["official", "eliminate"])
def test_parts_merged_give_the_draw_of_the_whole_candidate_set(impl, mode):
    check_parts_merged(impl, mode, problem())


def check_parts_merged(impl, mode, args):
    """[batch ; queue] as separate calls at their global column offsets, merged, is the one-call draw (parts cut at
    multiples of SAMPLE_BLOCK, so that every sampling block lies in one part)."""
    anchors, keys, pos_sims, anchor_ids, key_ids, valid = args
    cfg = FNEConfig(mode=mode, prior_ratio=10.0)
    run = lambda lo, hi: sample_negatives(anchors, keys[lo:hi], pos_sims, anchor_ids, key_ids[lo:hi], STATS, cfg,  # noqa: E731
                                          seed=4, valid=valid[lo:hi], impl=impl, col_offset=lo)
    whole = run(0, len(keys))
    merged = merge_samples([run(256, 640), run(0, 256), run(640, len(keys))], cfg)  # cuts at multiples of 128
    for name in ("index", "fallback", "survivors", "race_key", "fallback_score", "fallback_index"):
        assert torch.equal(getattr(whole, name), getattr(merged, name)), name
    assert torch.allclose(whole.weight_sum, merged.weight_sum, rtol=1e-5)


def test_dense_and_streaming_draw_the_same_indices_and_key_on_the_global_row():
    anchors, keys, pos_sims, anchor_ids, key_ids, valid = problem(b=40)
    run = lambda impl, lo, hi: sample_negatives(anchors[lo:hi], keys, pos_sims[lo:hi], anchor_ids[lo:hi], key_ids,  # noqa: E731
                                                STATS, FNEConfig(), seed=2, valid=valid, impl=impl, row_offset=lo)
    whole = run("dense", 0, 40)
    assert torch.equal(whole.index, run("torch", 0, 40).index)
    split = torch.cat([run("dense", 0, 13).index, run("dense", 13, 40).index])
    assert torch.equal(whole.index, split)  # a rank's rows draw what they draw in the whole batch


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_without_any_valid_negative_get_none_never_column_0_or_a_positive(impl):
    anchors, keys, pos_sims, anchor_ids, key_ids, valid = problem(b=6, n=50)
    key_ids = key_ids.clone()
    key_ids[valid] = anchor_ids[0]  # row 0: every valid candidate is its positive
    res = sample_negatives(anchors, keys, pos_sims, anchor_ids, key_ids, STATS, FNEConfig(), valid=valid, impl=impl)
    assert res.index[0] == NO_NEGATIVE and not res.fallback[0] and res.survivors[0] == 0
    others = res.index[1:][res.has_negative[1:]]
    assert valid[others].all()


@pytest.mark.parametrize("impl", IMPLS)
def test_eliminate_never_falls_back(impl):
    anchors, keys, pos_sims, anchor_ids, key_ids, valid = problem(b=5, n=64)
    cfg = FNEConfig(mode="eliminate", cutdown="anchor")
    high = torch.full_like(pos_sims, 5.0)  # every weight is cut: official would fall back, eliminate gives none
    res = sample_negatives(anchors, keys, high, anchor_ids, key_ids, STATS, cfg, valid=valid, impl=impl)
    assert (res.index == NO_NEGATIVE).all() and not res.fallback.any()


def block_law_problem(b=3000, n_blocks=10, d=16, seed=0):
    """One anchor repeated b times (each row has its own random numbers) against n_blocks * SAMPLE_BLOCK candidates
    pulled towards it by amounts that vary from block to block, so the block weights W_b differ."""
    g = torch.Generator().manual_seed(seed)
    anchor = F.normalize(torch.randn(1, d, generator=g), dim=1)
    n = n_blocks * SAMPLE_BLOCK
    pull = torch.linspace(0.2, 3.0, n_blocks).repeat_interleave(SAMPLE_BLOCK)[:, None]
    keys = F.normalize(torch.randn(n, d, generator=g) / d**0.5 + pull * anchor, dim=1)
    pos_sims = torch.full((b,), (anchor @ keys.T).max().item() + 0.05)
    return anchor.expand(b, d).contiguous(), keys, pos_sims, torch.full((b,), -7), torch.arange(n)


def check_block_law(impl, device="cpu", **kw):
    """Two-level law: the drawn block follows W_b / W over many blocks, and a row whose weight sits in one block
    (every other block invalid) draws its columns with w_j / W_b."""
    anchors, keys, pos_sims, ids_a, ids_k = block_law_problem(**kw)
    cfg = FNEConfig(cutdown="off")
    w = fne_weights(anchors[:1] @ keys.T, pos_sims[:1], torch.zeros(1, len(keys), dtype=torch.bool), STATS, cfg)[0]
    valid = torch.zeros(len(keys), dtype=torch.bool)
    valid[3 * SAMPLE_BLOCK:4 * SAMPLE_BLOCK] = True
    anchors, keys, pos_sims, ids_a, ids_k, valid = (x.to(device) for x in (anchors, keys, pos_sims, ids_a, ids_k, valid))
    res = sample_negatives(anchors, keys, pos_sims, ids_a, ids_k, STATS, cfg, seed=21, impl=impl)
    assert_law(res.index.cpu() // SAMPLE_BLOCK, w.view(-1, SAMPLE_BLOCK).sum(1))
    res = sample_negatives(anchors, keys, pos_sims, ids_a, ids_k, STATS, cfg, seed=22, impl=impl, valid=valid)
    assert_law(res.index.cpu() - 3 * SAMPLE_BLOCK, w[valid.cpu()])


@pytest.mark.parametrize("impl", IMPLS)
def test_block_law_over_many_blocks_and_inside_one_block(impl):
    check_block_law(impl)


def check_one_fallback_row_among_drawn_rows(impl, device="cpu", b=300):
    """A row without weight (its anchor cut-down removes every candidate) between rows that draw: it takes its
    hardest valid negative, the others draw as they do without it."""
    anchors, keys, pos_sims, anchor_ids, key_ids, valid = problem(b=b, n=700)
    pos_sims = torch.zeros_like(pos_sims)  # cut s <= -0.2: every other row keeps candidates
    pos_sims[b // 2] = 5.0
    cfg = FNEConfig(cutdown="anchor")
    w, scores = dense_weights(anchors, keys, pos_sims, anchor_ids, key_ids, valid, cfg)
    args = (x.to(device) for x in (anchors, keys, pos_sims, anchor_ids, key_ids))
    res = sample_negatives(*args, STATS, cfg, seed=8, valid=valid.to(device), impl=impl)
    res = type(res)(*(x.cpu() for x in vars(res).values()))
    assert res.fallback.nonzero().flatten().tolist() == [b // 2]
    assert res.index[b // 2] == scores[b // 2].argmax() == res.fallback_index[b // 2]
    drawn = torch.arange(b) != b // 2
    assert (w[drawn, res.index[drawn]] > 0).all() and (res.fallback_index[drawn] == NO_NEGATIVE).all()
    assert torch.isinf(res.race_key[b // 2]) and torch.isfinite(res.race_key[drawn]).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_one_fallback_row_among_drawn_rows(impl):
    check_one_fallback_row_among_drawn_rows(impl)


@pytest.mark.parametrize("host_reads", [True, False], ids=["cpu-rows-pending", "gpu-all-rows-selected"])
@pytest.mark.parametrize("tile", [128, 384])
def test_streaming_fallback_columns_across_tiles_match_dense(tile, host_reads, monkeypatch):
    """The streaming sampler finds a fallback column only for rows without weight so far (the tile step computes
    no argmax): rows that fall back, whose best score rises tile after tile, take the dense reference's column;
    rows that draw report none, and the fallback scores agree everywhere.  Both ways of finding the columns: the
    pending rows' argmaxes (CPU) and every row's, selected without a host sync (GPU)."""
    from fne_dist import sampler

    monkeypatch.setattr(sampler, "host_reads_are_free", lambda device: host_reads)
    anchors, keys, pos_sims, anchor_ids, key_ids, valid = problem(b=90, n=1000)
    pos_sims = torch.zeros_like(pos_sims)
    pos_sims[::3] = 5.0  # every third row: all weights cut, it falls back
    cfg = FNEConfig(cutdown="anchor")
    run = lambda impl, t=None: sample_negatives(anchors, keys, pos_sims, anchor_ids, key_ids, STATS, cfg,  # noqa: E731
                                                 seed=5, valid=valid, impl=impl, tile_size=t, col_offset=256)
    ref, got = run("dense"), run("torch", tile)
    assert torch.equal(ref.fallback, torch.arange(90) % 3 == 0)
    for name in ("index", "fallback", "survivors", "fallback_score", "fallback_index"):
        assert torch.equal(getattr(ref, name), getattr(got, name)), name


def test_compiled_tile_step_draws_what_the_eager_one_draws(monkeypatch):
    """Large CPU tiles run the torch.compile'd tile step (one fused loop): same indices, fallbacks and survivors as
    the eager rule, weight sums to float rounding."""
    from fne_dist import sampler

    anchors, keys, pos_sims, anchor_ids, key_ids, valid = problem(b=64, n=1500)
    run = lambda: sample_negatives(anchors, keys, pos_sims, anchor_ids, key_ids, STATS, FNEConfig(), seed=6,  # noqa: E731
                                   valid=valid, impl="torch", tile_size=512)
    eager = run()
    monkeypatch.setattr(sampler, "COMPILE_MIN_ELEMENTS", 0)
    compiled = run()
    assert sampler._COMPILED["tile_draw"] is not None, "compiling failed: the eager step ran instead"
    for name in ("index", "fallback", "survivors", "fallback_index"):
        assert torch.equal(getattr(eager, name), getattr(compiled, name)), name
    torch.testing.assert_close(compiled.weight_sum, eager.weight_sum, rtol=1e-5, atol=1e-6)


def test_a_tile_step_is_wrapped_by_torch_compile_once(monkeypatch):
    """torch.compile builds a new wrapper at every call (milliseconds of CPU), so compiled_step wraps each step once
    per process and reuses it (it once wrapped anew at every tile of every step: 2-5 ms a training step)."""
    from fne_dist import sampler

    wrapped = []

    def count_compile(step, **_):
        wrapped.append(step)
        return step

    monkeypatch.setattr(sampler, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(sampler, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", count_compile)
    sims = torch.randn(4, 8)
    for _ in range(3):
        assert torch.equal(sampler.compiled_step("double", lambda s: 2 * s, sims), 2 * sims)
    assert len(wrapped) == 1


def test_a_compiled_step_reads_bool_masks_as_bytes(monkeypatch):
    """Inductor's CPU loops load a bool tensor through a slow per-lane conversion (a third of a [128, 8320] tile
    step), so compiled_step hands each bool argument to the compiled step as uint8; steps read masks as `mask != 0`,
    which is the same mask in an eager step."""
    from fne_dist import sampler

    dtypes = []

    def record_dtypes(step, **_):
        def compiled(*args):
            dtypes.extend(a.dtype for a in args if isinstance(a, torch.Tensor))
            return step(*args)
        return compiled

    monkeypatch.setattr(sampler, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", record_dtypes)
    sims, mask = torch.randn(4, 8), torch.arange(8) % 3 > 0
    step = lambda s, keep: s.masked_fill(keep == 0, 0.0)  # noqa: E731
    for compile in (False, True):
        assert torch.equal(sampler.compiled_step("masked", step, sims, mask, compile=compile), sims * mask)
    assert dtypes == [torch.float32, torch.uint8]


def test_streaming_over_no_candidates_draws_nothing_and_merges_as_nothing():
    anchors, keys, pos_sims, anchor_ids, key_ids, valid = problem(b=9, n=300)
    empty = sample_negatives(anchors, keys[:0], pos_sims, anchor_ids, key_ids[:0], STATS, FNEConfig(), impl="torch")
    assert (empty.index == NO_NEGATIVE).all() and not empty.fallback.any() and (empty.survivors == 0).all()
    assert (empty.race_key == float("inf")).all() and (empty.fallback_score == float("-inf")).all()
    some = sample_negatives(anchors, keys, pos_sims, anchor_ids, key_ids, STATS, FNEConfig(), impl="torch",
                            valid=valid)
    merged = merge_samples([empty, some], FNEConfig())
    for name in ("index", "fallback", "survivors", "weight_sum", "race_key", "fallback_score", "fallback_index"):
        assert torch.equal(getattr(merged, name), getattr(some, name)), name


def check_directions_in_one_call(impl, device="cpu", **kw):
    """Both directions in one call (anchors [2, B, D], each direction its own keys and stream: the trainer's draw)
    give, field by field, what one call per direction gives: the same streams and weights, the same draws."""
    anchors, keys, pos_sims, anchor_ids, key_ids, valid = (t.to(device) for t in problem(b=45, n=700, seed=1))
    other, other_keys, other_pos, *_ = (t.to(device) for t in problem(b=45, n=700, seed=2))
    pos_sims[::9] = other_pos[::7] = 5.0  # every candidate cut (s <= p - margin): these rows fall back
    common = dict(seed=8, step=3, valid=valid, impl=impl, row_offset=5, col_offset=128, **kw)
    cfg = FNEConfig(mode="bayes", cutdown="anchor", prior_ratio=10.0)
    together = sample_negatives(torch.stack((anchors, other)), (keys, other_keys), torch.stack((pos_sims, other_pos)),
                                anchor_ids, key_ids, STATS, cfg, direction=(0, 1), **common)
    alone = [sample_negatives(a, k, p, anchor_ids, key_ids, STATS, cfg, direction=d, **common)
             for d, (a, k, p) in enumerate(((anchors, keys, pos_sims), (other, other_keys, other_pos)))]
    assert together.index.shape == (2, 45)
    assert 0 < together.fallback.sum() < 90 and together.has_negative.all()  # draws and fallbacks both
    for name in ("index", "fallback", "survivors", "race_key", "fallback_score", "fallback_index"):
        assert torch.equal(getattr(together, name), torch.stack([getattr(r, name) for r in alone])), name
    torch.testing.assert_close(together.weight_sum, torch.stack([r.weight_sum for r in alone]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("impl, tile", [("dense", None), ("torch", None), ("torch", 256)])
def test_both_directions_in_one_call_draw_what_a_call_each_draws(impl, tile):
    check_directions_in_one_call(impl, tile_size=tile)


def test_both_directions_in_one_compiled_tile_step_draw_what_a_call_each_draws(monkeypatch):
    from fne_dist import sampler

    monkeypatch.setattr(sampler, "COMPILE_MIN_ELEMENTS", 0)
    check_directions_in_one_call("torch", tile_size=384)
    assert sampler._COMPILED["tile_draw"] is not None, "compiling failed: the eager step ran instead"


def check_parts_in_one_pass(**kw):
    """Candidate parts of any length at any global columns (the buffer's batch and ring segments, a short part far
    on), read by the torch sampler in one pass (each part padded to whole sampling blocks, tiles straddling parts
    and padding), draw what one call per part draws, merged: the same blocks, streams and weights."""
    anchors, keys, pos_sims, anchor_ids, key_ids, valid = problem(b=45, n=700, seed=1)
    other, other_keys, other_pos, *_ = problem(b=45, n=700, seed=2)
    pos_sims[::9] = other_pos[::7] = 5.0  # every candidate cut (s <= p - margin): these rows fall back
    cuts = [(0, 45, 0, None), (45, 695, 45, valid[45:695]), (695, 700, 5000, valid[695:])]  # (lo, hi, column, valid)
    parts = [KeyPart((keys[lo:hi], other_keys[lo:hi]), key_ids[lo:hi], v, col) for lo, hi, col, v in cuts]
    cfg = FNEConfig(mode="bayes", cutdown="anchor", prior_ratio=10.0)
    both, both_pos = torch.stack((anchors, other)), torch.stack((pos_sims, other_pos))

    def draw(parts, impl):
        return sample_parts(both, parts, both_pos, anchor_ids, STATS, cfg, seed=8, step=3, row_offset=5, impl=impl,
                            **kw)

    one_pass = draw(parts, "torch")
    each = merge_samples([draw([part], "torch") for part in parts], cfg)
    assert one_pass.index.shape == (2, 45)
    assert 0 < one_pass.fallback.sum() < 90 and one_pass.has_negative.all()  # draws and fallbacks both
    drawn = one_pass.index[~one_pass.fallback]
    assert (drawn < 45).any() and ((drawn >= 45) & (drawn < 695)).any()  # draws from the batch and the ring parts
    assert ((drawn < 695) | ((drawn >= 5000) & (drawn < 5005))).all()
    for name in ("index", "fallback", "survivors", "fallback_index"):
        assert torch.equal(getattr(one_pass, name), getattr(each, name)), name
    # a part's products land in a wider tile, where BLAS may sum a dot product in another order: floats to rounding
    for name in ("race_key", "fallback_score"):
        torch.testing.assert_close(getattr(one_pass, name), getattr(each, name), rtol=1e-6, atol=0)
    torch.testing.assert_close(one_pass.weight_sum, each.weight_sum, rtol=1e-5, atol=0)
    assert torch.equal(one_pass.index, draw(parts, "dense").index)


@pytest.mark.parametrize("tile", [None, 128, 256, 384])
def test_parts_in_one_streaming_pass_draw_what_a_call_each_draws(tile):
    check_parts_in_one_pass(tile_size=tile)


def test_parts_in_one_compiled_pass_draw_what_a_call_each_draws(monkeypatch):
    from fne_dist import sampler

    monkeypatch.setattr(sampler, "COMPILE_MIN_ELEMENTS", 0)
    check_parts_in_one_pass(tile_size=256)
    assert sampler._COMPILED["tile_draw"] is not None, "compiling failed: the eager step ran instead"


def test_directions_need_their_own_keys_and_positive_similarities():
    anchors, keys, pos_sims, anchor_ids, key_ids, _ = problem(b=3, n=10)
    with pytest.raises(ValueError, match="give each direction all four"):
        sample_negatives(torch.stack((anchors, anchors)), (keys,), torch.stack((pos_sims, pos_sims)), anchor_ids,
                         key_ids, STATS, FNEConfig(), direction=(0, 1))
