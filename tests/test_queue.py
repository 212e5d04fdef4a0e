"""MomentumQueue: ring-buffer order for any G and Q, validity, shards of the ring, refusal of Q < G (by the buffer,
with the fix; by the ring itself), state."""
import pytest
import torch

from fne_dist.buffer import NegativeBuffer
from fne_dist.queue import GlobalKeys, MomentumQueue


def keys(start: int, g: int, d: int = 2) -> GlobalKeys:
    ids = torch.arange(start, start + g)
    feats = ids[:, None].float().expand(g, d)
    return GlobalKeys(feats, -feats, ids, ids % 2)


@pytest.mark.parametrize("q, g", [(10, 3), (7, 7), (9, 4), (5, 1)])
def test_ring_buffer_holds_the_latest_keys_in_slot_order(q, g):
    queue, written = MomentumQueue(q, 2), []
    for step in range(6):
        queue.enqueue(keys(100 * step, g))
        written += list(range(100 * step, 100 * step + g))
    slots = {}
    for i, key_id in enumerate(written):
        slots[i % q] = key_id
    want = torch.tensor([slots.get(s, -1) for s in range(q)])
    assert torch.equal(queue.ids, want)
    assert torch.equal(queue.valid, want >= 0)
    assert torch.equal(queue.image[:, 0][queue.valid], want[want >= 0].float())
    assert torch.equal(queue.text, -queue.image) and torch.equal(queue.labels[queue.valid], want[want >= 0] % 2)
    assert queue.ptr == len(written) % q


@pytest.mark.parametrize("q, g", [(10, 3), (9, 4), (5, 5)])
def test_shards_of_the_ring_together_hold_the_whole_ring(q, g):
    whole = MomentumQueue(q, 2)
    shards = [MomentumQueue(q, 2, slots=s) for s in ((0, 3), (3, 3), (3, q))]
    for step in range(5):
        for queue in (whole, *shards):
            queue.enqueue(keys(100 * step, g))
    for name in MomentumQueue.BUFFERS:
        assert torch.equal(torch.cat([getattr(s, name) for s in shards]), getattr(whole, name)), name
    assert {s.ptr for s in shards} == {whole.ptr}


def test_queue_smaller_than_global_batch_is_refused():
    with pytest.raises(ValueError, match="smaller than the global batch 6.*at least 6"):
        NegativeBuffer(4, 2, torch.float32, "cpu").enqueue(keys(0, 6))
    with pytest.raises(ValueError, match="a batch of 6 rows does not fit a ring of 4 slots"):
        MomentumQueue(4, 2).enqueue(keys(0, 6))


def test_state_round_trip_and_shape_mismatch():
    queue = MomentumQueue(6, 2, dtype=torch.bfloat16)
    for s in range(3):
        queue.enqueue(keys(10 * s, 4))
    other = MomentumQueue(6, 2, dtype=torch.bfloat16)
    other.load_state_dict(queue.state_dict())
    for name in MomentumQueue.BUFFERS:
        assert torch.equal(getattr(other, name), getattr(queue, name))
    assert other.ptr == queue.ptr
    with pytest.raises(ValueError, match="queue size"):
        MomentumQueue(8, 2).load_state_dict(queue.state_dict())
