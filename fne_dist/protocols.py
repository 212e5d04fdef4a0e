"""The standard image-text retrieval protocols over `retrieval_metrics`, with any number of captions per image.

  full      the whole evaluation set, as it is
  flickr1k  Flickr30K 1K test: the whole Karpathy test split, which must hold 1000 images
  coco5k    MS-COCO 5K test: the whole Karpathy test split, which must hold 5000 images
  coco1k    MS-COCO 1K test: the 5K test split cut into 5 folds of 1000 consecutive images (in the split's order,
            each with all its captions), evaluated separately and averaged; this is the number most papers
            report as "COCO 1K"

With the images' groups (the shards' labels), every protocol also reports the group-aware recall (`group_...`).
The named protocols check the image count so that a wrong split (val for test, a partial set) cannot be reported
under a standard name.
"""
from __future__ import annotations

import torch

from fne_dist.data.shards import DataError
from fne_dist.retrieval import COLUMNS, GROUP_COLUMNS, retrieval_metrics

PROTOCOLS = ("full", "flickr1k", "coco5k", "coco1k")
_SIZES = {"flickr1k": 1000, "coco5k": 5000, "coco1k": 5000}
FOLD = 1000


def folds(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor, size: int,
          groups: torch.Tensor | None = None):
    """(image_emb, text_emb, text_to_image, groups) of consecutive folds of `size` images with their captions."""
    for start in range(0, image_emb.shape[0], size):
        keep = (text_to_image >= start) & (text_to_image < start + size)
        yield (image_emb[start:start + size], text_emb[keep], text_to_image[keep] - start,
               None if groups is None else groups[start:start + size])


def check_protocol(protocol: str, n_images: int) -> None:
    """A set of `n_images` images can be reported under `protocol` (a DataError naming the fix if not): fne-eval
    asks before it embeds the set."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if protocol in _SIZES and n_images != _SIZES[protocol]:
        raise DataError(f"protocol {protocol!r} needs the {_SIZES[protocol]}-image Karpathy test split, got "
                        f"{n_images} images: evaluate the test split's shards, or use protocol 'full'")


def evaluate_protocol(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                      protocol: str, groups: torch.Tensor | None = None) -> dict[str, float]:
    """R@1/5/10 both ways and rsum (percent) under `protocol`, plus `images` and `texts` (the set's sizes); with
    `groups` (per image) the group-aware ones too (`retrieval_metrics`)."""
    n_images = image_emb.shape[0]
    check_protocol(protocol, n_images)
    if protocol == "coco1k":
        parts = [retrieval_metrics(*fold[:3], groups=fold[3])
                 for fold in folds(image_emb, text_emb, text_to_image, FOLD, groups)]
        metrics = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
    else:
        metrics = retrieval_metrics(image_emb, text_emb, text_to_image, groups=groups)
    return {**metrics, "images": n_images, "texts": text_emb.shape[0]}


def format_table(results: dict[str, dict]) -> str:
    """Plain-text table, one row per named result (e.g. per protocol or per checkpoint)."""
    if not all(isinstance(r, dict) for r in results.values()):
        raise TypeError("format_table takes {name: metrics}, e.g. format_table({'coco1k': evaluate_protocol(...)})")
    columns = [c for c in (*COLUMNS, *GROUP_COLUMNS) if all(c in r for r in results.values())]
    header = ["", "images", "texts"] + columns
    rows = [[name, str(r["images"]), str(r["texts"])] + [f"{r[c]:.2f}" for c in columns]
            for name, r in results.items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    return "\n".join(lines)
