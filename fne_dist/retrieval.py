"""Image-text retrieval recall with any number of captions per image."""
from __future__ import annotations

import torch

KS = (1, 5, 10)


@torch.no_grad()
def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                      ks: tuple[int, ...] = KS) -> dict[str, float]:
    """R@k in percent both ways and rsum (their sum).

    image_emb [I, D] and text_emb [T, D] are L2-normalised; text_to_image [T] gives each caption's image row.
    image->text: an image is a hit at k if any of its captions ranks in the top k texts;
    text->image: a caption is a hit at k if its image ranks in the top k images.
    Ties count against the positive (the pessimistic rank): an item scoring exactly as high as the positive ranks
    ahead of it, so a collapsed model (all scores equal) or bf16 ties cannot score above chance.
    """
    sims = image_emb.float() @ text_emb.float().T  # [I, T]
    n_img = sims.shape[0]
    owner = text_to_image.to(sims.device)
    is_pos = owner[None, :] == torch.arange(n_img, device=sims.device)[:, None]  # [I, T]
    # rank of the best positive caption per image = number of other captions scoring at least as high
    best_pos = sims.masked_fill(~is_pos, float("-inf")).max(1, keepdim=True).values
    i2t_rank = ((sims >= best_pos) & ~is_pos).sum(1)
    # rank of each caption's image = number of other images scoring at least as high
    t2i_rank = ((sims >= sims.gather(0, owner[None, :])) & ~is_pos).sum(0)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * (i2t_rank < k).float().mean().item()
    for k in ks:
        out[f"t2i_R@{k}"] = 100.0 * (t2i_rank < k).float().mean().item()
    out["rsum"] = sum(out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks)
    return out
