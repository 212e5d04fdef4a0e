"""The replicated momentum queue that, with the global batch, forms the buffer of candidate negatives."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fne_dist.distributed import all_gather_cat


def check_queue_size(size: int, global_batch: int, why: str = "world size x per-rank batch") -> None:
    """The queue must hold a whole global batch, which every step enqueues (the one home of this rule)."""
    if global_batch > size:
        raise ValueError(f"fne.queue_size={size} is smaller than the global batch {global_batch} ({why}): set "
                         f"fne.queue_size to at least {global_batch}, or lower data.batch_size")


@dataclass
class GlobalKeys:
    """Momentum keys of the global batch, all-gathered in rank order: image [G, D], text [G, D], ids [G],
    labels [G] (class labels where the data has them, else -1; used only to measure false negatives)."""

    image: torch.Tensor
    text: torch.Tensor
    ids: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def gather(cls, image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor,
               labels: torch.Tensor | None = None) -> "GlobalKeys":
        """All-gather this rank's keys, ids and labels (FNE_SPEC step 3)."""
        labels = torch.full_like(ids, -1) if labels is None else labels
        return cls(*(all_gather_cat(t.detach()) for t in (image, text, ids, labels)))


@dataclass
class Candidates:
    """[global batch ; queue]: image [N, D], text [N, D], ids [N], labels [N], valid [N]."""

    image: torch.Tensor
    text: torch.Tensor
    ids: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor


class MomentumQueue:
    """Ring buffer of image keys, text keys and ids with an explicit validity mask.

    Every rank enqueues the same all-gathered global batch, so all copies stay identical without any
    further communication.  Slots never written are invalid and are never sampled.
    """

    BUFFERS = ("image", "text", "ids", "labels", "valid")

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if size < 1:
            raise ValueError(f"MomentumQueue size={size} must be >= 1")
        self.size = size
        self.image = torch.zeros(size, dim, dtype=dtype, device=device)
        self.text = torch.zeros(size, dim, dtype=dtype, device=device)
        self.ids = torch.full((size,), -1, dtype=torch.long, device=device)
        self.labels = torch.full((size,), -1, dtype=torch.long, device=device)
        self.valid = torch.zeros(size, dtype=torch.bool, device=device)
        self.ptr = 0

    def check_global_batch(self, global_batch: int) -> None:
        check_queue_size(self.size, global_batch)

    def candidates(self, keys: GlobalKeys) -> Candidates:
        """Global batch keys first, then the queue as it is before this step's enqueue (FNE_SPEC step 3)."""
        dtype = self.image.dtype
        batch_valid = torch.ones(len(keys.ids), dtype=torch.bool, device=self.valid.device)
        return Candidates(
            torch.cat([keys.image.to(dtype), self.image]),
            torch.cat([keys.text.to(dtype), self.text]),
            torch.cat([keys.ids, self.ids]),
            torch.cat([keys.labels, self.labels]),
            torch.cat([batch_valid, self.valid]),
        )

    @torch.no_grad()
    def enqueue(self, keys: GlobalKeys) -> None:
        """Write the global batch at the pointer, wrapping around (FNE_SPEC step 10)."""
        g = len(keys.ids)
        self.check_global_batch(g)
        slots = (self.ptr + torch.arange(g, device=self.ids.device)) % self.size
        self.image[slots] = keys.image.to(self.image.dtype)
        self.text[slots] = keys.text.to(self.text.dtype)
        self.ids[slots] = keys.ids
        self.labels[slots] = keys.labels
        self.valid[slots] = True
        self.ptr = (self.ptr + g) % self.size

    def state_dict(self) -> dict:
        return {name: getattr(self, name).cpu() for name in self.BUFFERS} | {"ptr": self.ptr}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["image"].shape) != tuple(self.image.shape):
            raise ValueError(f"queue in the checkpoint is {tuple(state['image'].shape)}, this run's is "
                             f"{tuple(self.image.shape)}: resume with the checkpoint's queue size and embedding width")
        for name in self.BUFFERS:
            getattr(self, name).copy_(state[name])
        self.ptr = int(state["ptr"])
