"""The momentum queue: the ring (whole, or one rank's shard of it) that, with the global batch, forms the buffer of
candidate negatives.  How the buffer is laid out across ranks and how large the ring must be is fne_dist.buffer's
policy; the ring only stores."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fne_dist.distributed import all_gather_cat


@dataclass
class GlobalKeys:
    """Momentum keys of the global batch, all-gathered in rank order: image [G, D], text [G, D], ids [G],
    labels [G] (class labels where the data has them, else -1; used only to measure false negatives).  D is 0 for
    an objective that reads neither keys nor a buffer: only its ids and labels travel."""

    image: torch.Tensor
    text: torch.Tensor
    ids: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def gather(cls, image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor,
               labels: torch.Tensor | None = None) -> "GlobalKeys":
        """All-gather this rank's keys, ids and labels (FNE_SPEC step 3) in one collective: a row packs its image
        and text keys and its int64 id and label viewed as the keys' dtype (lossless); the keys returned are views
        of the gathered rows."""
        labels = torch.full_like(ids, -1) if labels is None else labels
        dtype, (n, dim) = torch.promote_types(image.dtype, text.dtype), image.shape
        tail = 2 * 8 // dtype.itemsize  # the id and the label in the keys' dtype
        # the row is padded to 2 D + 16 elements: aligned rows for the sampler kernel, which reads the keys in place
        rows = image.new_zeros(n, 2 * dim + 16, dtype=dtype)
        rows[:, :dim], rows[:, dim:2 * dim] = image.detach(), text.detach()
        rows[:, 2 * dim:2 * dim + tail] = torch.stack([ids, labels], 1).view(dtype)
        rows = all_gather_cat(rows)
        ids, labels = rows[:, 2 * dim:2 * dim + tail].contiguous().view(torch.int64).T.contiguous()
        return cls(rows[:, :dim], rows[:, dim:2 * dim], ids, labels)


class MomentumQueue:
    """Ring buffer of image keys, text keys, ids and labels with an explicit validity mask: the whole ring of
    `size` slots, or the contiguous range `slots = (lo, hi)` of it that this rank owns (the sharded buffer).

    The pointer walks the whole ring on every rank; `enqueue` gets the same all-gathered global batch everywhere
    and writes only the slots this queue holds, so replicated copies stay identical and shards stay disjoint
    without further communication.  Slots never written are invalid and are never sampled.
    """

    BUFFERS = ("image", "text", "ids", "labels", "valid")

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 slots: tuple[int, int] | None = None):
        if size < 1:
            raise ValueError(f"MomentumQueue size={size} must be >= 1")
        self.size = size
        self.lo, self.hi = slots or (0, size)
        if not 0 <= self.lo <= self.hi <= size:
            raise ValueError(f"MomentumQueue slots={slots} must lie within [0, {size}]")
        n = self.hi - self.lo
        self.image = torch.zeros(n, dim, dtype=dtype, device=device)
        self.text = torch.zeros(n, dim, dtype=dtype, device=device)
        self.ids = torch.full((n,), -1, dtype=torch.long, device=device)
        self.labels = torch.full((n,), -1, dtype=torch.long, device=device)
        self.valid = torch.zeros(n, dtype=torch.bool, device=device)
        self.ptr = 0

    def __len__(self) -> int:
        return self.hi - self.lo

    @torch.no_grad()
    def enqueue(self, keys: GlobalKeys) -> None:
        """Write the global batch at the pointer, wrapping around (FNE_SPEC step 10); rows whose ring slot lies
        outside this queue's range are left to the shard that holds them.  Slice copies only (no host sync)."""
        g = len(keys.ids)
        if g > self.size:
            raise ValueError(f"a batch of {g} rows does not fit a ring of {self.size} slots (NegativeBuffer checks the "
                             "queue size against the global batch)")
        start, self.ptr = self.ptr, (self.ptr + g) % self.size
        # the batch covers ring slots [start, start + g) mod size: at most two linear runs; batch row = slot - base
        for base, lo, hi in ((start, start, min(start + g, self.size)), (start - self.size, 0, start + g - self.size)):
            lo, hi = max(lo, self.lo), min(hi, self.hi)
            if lo >= hi:
                continue
            rows = slice(lo - base, hi - base)
            here = slice(lo - self.lo, hi - self.lo)
            self.image[here] = keys.image[rows].to(self.image.dtype)
            self.text[here] = keys.text[rows].to(self.text.dtype)
            self.ids[here] = keys.ids[rows]
            self.labels[here] = keys.labels[rows]
            self.valid[here] = True

    def state_dict(self) -> dict:
        return {name: getattr(self, name).cpu() for name in self.BUFFERS} | {
            "ptr": self.ptr, "size": self.size, "slots": (self.lo, self.hi)}

    def load_state_dict(self, state: dict) -> None:
        saved = (state.get("size", len(state["ids"])), tuple(state.get("slots", (0, len(state["ids"])))))
        if saved != (self.size, (self.lo, self.hi)) or state["image"].shape[1:] != self.image.shape[1:]:
            raise ValueError(
                f"the queue in the checkpoint holds slots {saved[1]} of {saved[0]} x {state['image'].shape[1]}, "
                f"this run's slots {(self.lo, self.hi)} of {self.size} x {self.image.shape[1]}: resume with the "
                "checkpoint's queue size, embedding width, buffer layout and world size")
        for name in self.BUFFERS:
            getattr(self, name).copy_(state[name])
        self.ptr = int(state["ptr"])
