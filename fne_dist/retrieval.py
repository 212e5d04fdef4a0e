"""Image-text retrieval recall with any number of captions per image, exact and group-aware."""
from __future__ import annotations

import torch

KS = (1, 5, 10)
COLUMNS = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in KS] + ["rsum"]  # the exact keys
GROUP = "group_"  # prefix of the group-aware keys
GROUP_COLUMNS = [GROUP + c for c in COLUMNS]


def _recalls(sims: torch.Tensor, is_pos: torch.Tensor, ks: tuple[int, ...], prefix: str = "") -> dict[str, float]:
    """R@k both ways and rsum where `is_pos` [I, T] marks the hits: image->text ranks each image's best positive
    caption, text->image each caption's best positive image; the caption's own image is always positive."""
    # rank of the best positive = number of non-positives scoring at least as high (ties count against it)
    best_text = sims.masked_fill(~is_pos, float("-inf")).max(1, keepdim=True).values
    i2t_rank = ((sims >= best_text) & ~is_pos).sum(1)
    best_image = sims.masked_fill(~is_pos, float("-inf")).max(0, keepdim=True).values
    t2i_rank = ((sims >= best_image) & ~is_pos).sum(0)
    out = {}
    for k in ks:
        out[f"{prefix}i2t_R@{k}"] = 100.0 * (i2t_rank < k).float().mean().item()
    for k in ks:
        out[f"{prefix}t2i_R@{k}"] = 100.0 * (t2i_rank < k).float().mean().item()
    out[f"{prefix}rsum"] = sum(out[f"{prefix}{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks)
    return out


@torch.no_grad()
def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                      ks: tuple[int, ...] = KS, groups: torch.Tensor | None = None) -> dict[str, float]:
    """R@k in percent both ways and rsum (their sum); with `groups`, also the group-aware ones (keys `group_...`).

    image_emb [I, D] and text_emb [T, D] are L2-normalised; text_to_image [T] gives each caption's image row.
    image->text: an image is a hit at k if any of its captions ranks in the top k texts;
    text->image: a caption is a hit at k if its image ranks in the top k images.
    Ties count against the positive (the pessimistic rank): an item scoring exactly as high as the positive ranks
    ahead of it, so a collapsed model (all scores equal) or bf16 ties cannot score above chance.
    groups [I] (the group of each image: images that a caption of either fits): the group-aware recall counts
    a hit for any item of the query's group (a caption of any image of the image's group; any image of the
    caption's image's group), the same way with ties.  With one image per group both are the same.
    """
    sims = image_emb.float() @ text_emb.float().T  # [I, T]
    owner = text_to_image.to(sims.device)
    rows = torch.arange(sims.shape[0], device=sims.device)
    out = _recalls(sims, owner[None, :] == rows[:, None], ks)
    if groups is not None:
        groups = groups.to(sims.device)
        out.update(_recalls(sims, groups[owner][None, :] == groups[:, None], ks, GROUP))
    return out
