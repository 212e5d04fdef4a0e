"""The global buffer of candidate negatives, [global batch ; queue before enqueue], replicated or sharded.

Global columns (FNE_SPEC step 3): the step's all-gathered batch keys are columns [0, G), ring slot s of the queue
is column G + s.  The buffer hands the sampler these candidates as `Segment`s, views at their global column offset
(never a concatenation: no per-step copy of the queue), read in one sampler call (`fne.sample_parts`: the torch
sampler streams them as one candidate set, the kernel draws each and `merge_samples` combines the draws exactly).

replicated: every rank holds the whole queue and draws its own b anchors against every segment.
sharded: rank r holds a contiguous range of the batch columns and of the ring slots, cut at multiples of
SAMPLE_BLOCK from each segment's start (so every sampling block lies in one shard and the draw is the replicated
one, bit for bit); the shares differ by at most one block.  Per step, both directions at once (each collective
carries the two directions' rows):
  1. all-gather the anchors and their positive similarities (2 x G x D);
  2. draw all G anchors of both directions against this rank's segments (one sampler call): per-anchor partials
     over its candidates;
  3. an all-to-all exchange (three calls: floats, integers, keys) sends each anchor's partials (race key, weight sum,
     fallback score, index, survivors, fallback index), with the key, id and label of this rank's choice, to the
     anchor's rank;
  4. the anchor's rank merges the world partials (`merge_samples`) and keeps the key of the part whose choice won.
The posterior InfoNCE over the buffer (`infonce`) is exchanged the same way: each rank's partial log-sum-exps of
all G anchors over its shard go to the anchors' ranks, and its gradient partials come back (fne_dist.infonce).
The at-risk count (`at_risk`, a diagnostic) is additive: each rank counts its candidates for all G anchors, and one
all-reduce of 2 x G int32 sums the shards' counts.
An all-to-all, not an all-gather: each rank needs its own b rows only, so it receives world x b = G rows
(G x (D + 8) numbers a direction) where an all-gather would bring world x G.  Traffic is O(G x D) per rank,
independent of the buffer size; memory is the ring / world per rank plus the G batch keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from fne_dist.distributed import all_gather_cat, all_reduce, all_to_all
from fne_dist.fne import SAMPLE_BLOCK, FNEConfig, KeyPart, SampleResult, merge_samples, sample_parts
from fne_dist.infonce import Candidates, streamed_posterior_infonce
from fne_dist.queue import GlobalKeys, MomentumQueue
from fne_dist.sampler import host_reads_are_free
from fne_dist.stats import SimilarityStats

LAYOUTS = ("auto", "replicated", "sharded")  # auto: sharded when world > 1


def resolve_layout(layout: str, world: int) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"fne.buffer={layout!r} is unknown: use one of {LAYOUTS}")
    if layout == "auto":
        return "sharded" if world > 1 else "replicated"
    return layout


def check_queue_size(size: int, global_batch: int, why: str = "world size x per-rank batch") -> None:
    """The queue must hold a whole global batch, which every step enqueues (the one home of this rule)."""
    if global_batch > size:
        raise ValueError(f"fne.queue_size={size} is smaller than the global batch {global_batch} ({why}): set "
                         f"fne.queue_size to at least {global_batch}, or lower data.batch_size")


def block_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rank's share [lo, hi) of n columns: whole SAMPLE_BLOCKs (the last one may be short), contiguous, in rank
    order; shares differ by at most one block, and a rank beyond the blocks gets an empty share."""
    blocks = -(-n // SAMPLE_BLOCK)
    per, extra = divmod(blocks, world)
    first = rank * per + min(rank, extra)
    last = first + per + (rank < extra)
    return min(first * SAMPLE_BLOCK, n), min(last * SAMPLE_BLOCK, n)


@dataclass
class Segment:
    """Candidates at global columns [col_offset, col_offset + len): image, text [n, D], ids, labels [n], valid [n]
    (None: all valid).  The API for anything that reads the buffer (samplers, objectives over all candidates)."""

    col_offset: int
    image: torch.Tensor
    text: torch.Tensor
    ids: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.ids)

    def keys(self, direction: int) -> torch.Tensor:
        """The candidates of a direction: 0 image anchors -> text keys, 1 text anchors -> image keys."""
        return self.text if direction == 0 else self.image

    def candidates(self, direction: int) -> Candidates:
        """The segment as a direction's candidates for the InfoNCE objectives (views, read in place)."""
        return Candidates(self.keys(direction), self.ids, self.labels, self.valid)


@dataclass
class Negatives:
    """The draw for this rank's b anchors in each of K directions: the sample (fields [K, b]: global columns,
    NO_NEGATIVE where none) and the chosen candidates' keys [K, b, D] (buffer dtype, zero where none), ids and
    labels [K, b] (-1 where none)."""

    sample: SampleResult
    keys: torch.Tensor
    ids: torch.Tensor
    labels: torch.Tensor


class NegativeBuffer:
    """This rank's part of the buffer (the queue or its shard) and the draw of negatives from the whole buffer."""

    def __init__(self, size: int, dim: int, dtype: torch.dtype, device: torch.device | str, *,
                 layout: str = "auto", rank: int = 0, world: int = 1):
        self.layout = resolve_layout(layout, world)
        self.sharded = self.layout == "sharded"
        self.rank, self.world = rank, world
        self.queue = MomentumQueue(size, dim, dtype, device, block_range(size, world, rank) if self.sharded else None)

    @property
    def dtype(self) -> torch.dtype:
        return self.queue.image.dtype

    def segments(self, batch: GlobalKeys) -> list[Segment]:
        """This rank's candidates, in global column order: its part of the batch (G x D, converted to the buffer's
        dtype), then its ring slots (views)."""
        g, q = len(batch.ids), self.queue
        lo, hi = block_range(g, self.world, self.rank) if self.sharded else (0, g)
        out = []
        if hi > lo:
            image, text = (t[lo:hi].to(self.dtype) for t in (batch.image, batch.text))
            out.append(Segment(lo, image, text, batch.ids[lo:hi], batch.labels[lo:hi], None))
        if len(q):
            out.append(Segment(g + q.lo, q.image, q.text, q.ids, q.labels, q.valid))
        return out

    def enqueue(self, batch: GlobalKeys) -> None:
        check_queue_size(self.queue.size, len(batch.ids))
        self.queue.enqueue(batch)

    def draw(self, anchors: torch.Tensor, pos_sims: torch.Tensor, anchor_ids: torch.Tensor, batch: GlobalKeys,
             stats: SimilarityStats, rule: FNEConfig, *, row_offset: int, direction: tuple[int, ...] = (0, 1),
             **sampling) -> Negatives:
        """One negative from the whole buffer for each of this rank's anchors [K, b, D] in each of its K directions
        (pos_sims [K, b]; global rows row_offset + i; sharded: rows rank * b + i of `batch`, whose ids are the
        anchors' ids in rank order): one sampler call draws every direction over every segment.  `sampling`:
        seed, step, impl (see `sample_negatives`).  Collective when sharded (one exchange for all directions)."""
        if anchors.dim() != 3 or len(anchors) != len(direction) or pos_sims.shape != anchors.shape[:2]:
            raise ValueError(f"NegativeBuffer.draw takes anchors [K, b, D] and pos_sims [K, b] for its K directions "
                             f"{direction}; got {tuple(anchors.shape)} and {tuple(pos_sims.shape)}: stack the "
                             "directions' rows (torch.stack((image_anchors, text_anchors)))")
        segments = self.segments(batch)
        if not self.sharded:
            return _draw(segments, self.dtype, anchors, pos_sims, anchor_ids, stats, rule, row_offset=row_offset,
                         direction=direction, **sampling)
        everyone = _draw(segments, self.dtype, _gather_rows(anchors), _gather_rows(pos_sims), batch.ids, stats, rule,
                         row_offset=0, direction=direction, **sampling)
        return _merge_ranks(everyone, anchors.shape[1], self.world, rule)

    def infonce(self, anchors: torch.Tensor, scale: torch.Tensor, pos_keys: torch.Tensor, ids: torch.Tensor,
                labels: torch.Tensor, batch: GlobalKeys, stats: SimilarityStats, rule: FNEConfig, *, direction: int,
                queue_only: bool = False, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior-weighted InfoNCE of this rank's anchors [b, D] (ids, labels [b]; pos_keys: their own
        momentum keys) against the whole buffer's candidates of `direction`, or its queue only (`queue_only`: the
        batch's columns left out): per-row losses [b] and false-negative softmax mass [b]
        (`fne_dist.infonce.streamed_posterior_infonce`, `impl` as there).  The segments are read in place; sharded,
        every rank reads its own against all G anchors and the partials are exchanged (collective, in the backward
        too)."""
        segments = [s for s in self.segments(batch) if not queue_only or s.col_offset >= len(batch.ids)]
        anchor_ids, anchor_labels = (batch.ids, batch.labels) if self.sharded else (ids, labels)
        return streamed_posterior_infonce(anchors, scale, pos_keys, [s.candidates(direction) for s in segments],
                                          anchor_ids, anchor_labels, stats, rule, sharded=self.sharded, impl=impl)

    def at_risk(self, ids: torch.Tensor, labels: torch.Tensor, batch: GlobalKeys, *, row_offset: int) -> torch.Tensor:
        """[b] bool: this rank's anchor (global row row_offset + i) has a false negative among the whole buffer's
        candidates (`has_false_candidate`).  Sharded: each rank counts its own candidates for all G anchors and one
        all-reduce of the [2, G] counts sums them (collective), so both layouts give the same answer.  Where reading
        a value is free (the CPU) and no label of the global batch is known (web pairs), no anchor is at risk and
        nothing is counted (0.7 ms of a CPU step); every rank sees the same batch, so all skip the all-reduce."""
        if host_reads_are_free(ids.device) and not bool((batch.labels >= 0).any()):
            return torch.zeros_like(ids, dtype=torch.bool)
        segments = self.segments(batch)
        if not self.sharded:
            return has_false_candidate(labels, false_candidate_counts(ids, labels, segments))
        counts = all_reduce(false_candidate_counts(batch.ids, batch.labels, segments))
        return has_false_candidate(labels, counts[:, row_offset:row_offset + len(ids)])

    def state_dict(self) -> dict:
        return self.queue.state_dict() | {"layout": self.layout}

    def load_state_dict(self, state: dict) -> None:
        if state.get("layout", "replicated") != self.layout:
            raise ValueError(f"the checkpoint's buffer is {state.get('layout', 'replicated')}, this run's "
                             f"{self.layout}: resume with fne.buffer={state.get('layout', 'replicated')}")
        self.queue.load_state_dict(state)


def false_candidate_counts(ids: torch.Tensor, labels: torch.Tensor, segments: Iterable[Segment]) -> torch.Tensor:
    """[2, n] int32 for n anchors (ids, labels): how many valid candidates with a known label have the anchor's
    label (row 0) and its id (row 1).  Sums over disjoint candidate sets (segments, shards) add up."""
    counts = torch.zeros(2, len(ids), dtype=torch.int32, device=ids.device)
    for seg in segments:
        known = seg.labels >= 0 if seg.valid is None else seg.valid & (seg.labels >= 0)
        counts[0] += _count_equal(labels, seg.labels, known)
        counts[1] += _count_equal(ids, seg.ids, known)
    return counts


def has_false_candidate(labels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[n] bool from `false_candidate_counts`: the anchor's label is known and a candidate has it under another id
    (an image id has one label, so that is more candidates of its label than of its id)."""
    return (labels >= 0) & (counts[0] > counts[1])


def _count_equal(queries: torch.Tensor, values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """[n] how many `values` (where `where`) equal each of the n queries.  Sorts the few queries and looks every
    value up among them: no sort or copy of the values (a whole ring), no [n, N], no host synchronisation."""
    ordered = queries.sort().values
    at = torch.searchsorted(ordered, values, out_int32=True).clamp_(max=len(ordered) - 1)
    # counted at the first of each run of equal queries, which is where every query of the run looks
    counts = torch.zeros_like(ordered, dtype=torch.int32).index_add_(0, at, (where & (ordered[at] == values)).int())
    return counts[torch.searchsorted(ordered, queries)]


def _gather_rows(t: torch.Tensor) -> torch.Tensor:
    """[K, b, ...] of every rank -> [K, G, ...]: each direction's rows of all ranks, in rank order."""
    return all_gather_cat(t.transpose(0, 1)).transpose(0, 1).contiguous()


def _draw(segments: list[Segment], dtype: torch.dtype, anchors, pos_sims, anchor_ids, stats, rule, *, row_offset: int,
          direction: tuple[int, ...], **sampling) -> Negatives:
    """Each anchor's draw over these segments in every direction (anchors [K, n, D]; one sampler call over all of
    them, `sample_parts`) and its choice's key, in the buffer's dtype (`dtype`) even with no segment: the sharded
    exchange needs every rank's keys alike."""
    parts = [KeyPart(tuple(seg.keys(d) for d in direction), seg.ids, seg.valid, seg.col_offset) for seg in segments]
    sample = sample_parts(anchors, parts, pos_sims, anchor_ids, stats, rule, direction=direction,
                          row_offset=row_offset, **sampling)
    return Negatives(sample, *_take(segments, sample.index, direction, anchors.shape[-1], dtype))


def _take(segments: list[Segment], index: torch.Tensor, direction: tuple[int, ...], dim: int, dtype: torch.dtype):
    """Keys [K, b, D] (dtype: the buffer's, which its segments hold), ids and labels [K, b] of the chosen global
    columns index [K, b] (direction k's keys for row k), zero / -1 where no segment holds the column (gathers and
    selects only: no host synchronisation)."""
    device = index.device
    keys = torch.zeros(*index.shape, dim, dtype=dtype, device=device)
    ids = torch.full(index.shape, -1, dtype=torch.long, device=device)
    labels = torch.full_like(ids, -1)
    for seg in segments:
        local = index - seg.col_offset
        here = (local >= 0) & (local < len(seg))
        at = local.clamp(0, len(seg) - 1)
        chosen = torch.stack([seg.keys(d)[at[i]] for i, d in enumerate(direction)])
        keys = torch.where(here[..., None], chosen, keys)
        ids = torch.where(here, seg.ids[at], ids)
        labels = torch.where(here, seg.labels[at], labels)
    return keys, ids, labels


def _merge_ranks(everyone: Negatives, b: int, world: int, rule: FNEConfig) -> Negatives:
    """Steps 3-4 of the module docstring: this rank's b rows from every rank's partials over the G anchors, in
    every direction (one exchange: rows first, as all_to_all cuts dim 0)."""
    s = everyone.sample
    k = s.index.shape[0]
    floats = torch.stack([s.race_key.float(), s.weight_sum.float(), s.fallback_score.float()], -1)
    longs = torch.stack([s.index, s.survivors.long(), s.fallback_index, everyone.ids, everyone.labels], -1)
    # [K, G, ...] -> [G, K, ...] -> exchanged -> [world, K, b, ...]
    floats, longs, keys = (all_to_all(t.transpose(0, 1).contiguous()).view(world, b, k, -1).transpose(1, 2)
                           for t in (floats, longs, everyone.keys))
    none = torch.zeros(k, b, dtype=torch.bool, device=longs.device)
    parts = [SampleResult(index=longs[r, ..., 0], fallback=none, survivors=longs[r, ..., 1],
                          weight_sum=floats[r, ..., 1], race_key=floats[r, ..., 0], fallback_score=floats[r, ..., 2],
                          fallback_index=longs[r, ..., 2]) for r in range(world)]
    sample = merge_samples(parts, rule)
    # the rank whose own choice is the merged one (columns are disjoint across ranks: at most one)
    src = (longs[..., 0] == sample.index).int().argmax(0)
    directions, rows = torch.arange(k, device=longs.device)[:, None], torch.arange(b, device=longs.device)
    has = sample.has_negative
    return Negatives(sample, keys[src, directions, rows].where(has[..., None], 0),
                     longs[src, directions, rows, 3].where(has, -1), longs[src, directions, rows, 4].where(has, -1))
