"""The study's data: the two real captioned sets (`fne-make-shards openclipart | emoji`) and the frozen pretrained
towers' pooled features of every pair, computed once and cached.

The towers are the pretrained EfficientNet-Lite0 image trunk and MiniLM-L6 text trunk from local wheels, frozen
(fne_dist.pretrained), images at the towers' size through the tower's own evaluation transform.  The cache file
records what it was computed from (the shards' manifest and the towers' settings) and is recomputed when that
changes.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fne_dist.config import ImageTowerSection, ModelSection, TextTowerSection
from fne_dist.data.loader import load_eval_set
from fne_dist.data.shards import read_manifest

DATASETS = ("openclipart", "emoji")
FEATURE_BATCH = 64
CACHE_VERSION = 1


@dataclass
class Split:
    """Cached features of one split: image [P, Di] and text [P, Dt] per pair, image id [P], group [P] (pairs of
    one group but different images are false negatives of each other), and for evaluation each caption's image
    row: text_to_image [P] indexes `image_rows` [I] (the pairs' rows that hold each distinct image once)."""

    image: torch.Tensor
    text: torch.Tensor
    ids: torch.Tensor
    groups: torch.Tensor

    def eval_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows of the distinct images [I], each pair's image index into them [P])."""
        unique, inverse = torch.unique(self.ids, return_inverse=True)
        first = torch.full((len(unique),), len(self.ids), dtype=torch.long).scatter_reduce(
            0, inverse, torch.arange(len(self.ids)), reduce="amin")
        return first, inverse


def tower_section() -> ModelSection:
    """Both pretrained towers, frozen (only the projection heads train in the study)."""
    return ModelSection(name=None, embed_dim=256, image_tower=ImageTowerSection(freeze=True),
                        text_tower=TextTowerSection(freeze=True))


def build_shards(name: str, out: Path) -> dict:
    """The shards of one set (idempotent: an existing complete build is kept); returns the manifest."""
    from fne_dist.data.make_shards import main as make_shards

    if read_manifest(out) is None:
        code = make_shards([name, "--out", str(out), "--quiet"])
        if code:
            raise RuntimeError(f"fne-make-shards {name} --out {out} failed with exit code {code}")
    return read_manifest(out)


@torch.no_grad()
def _in_batches(fn, inputs: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(inputs[i:i + FEATURE_BATCH]) for i in range(0, len(inputs), FEATURE_BATCH)])


def split_features(towers, pattern: str) -> Split:
    """Every pair of the shards: image trunk features (each image computed once), text trunk features, image id,
    group (the shards' label)."""
    from fne_dist.pretrained import text_trunk_features, trunk_features

    data = load_eval_set(pattern, preprocess=towers.preprocess_val, tokenizer=towers.tokenizer)
    model = towers.model.eval()
    image = _in_batches(lambda x: trunk_features(model, x), data.images)
    text = _in_batches(lambda t: text_trunk_features(model, t), data.tokens)
    owner = data.text_to_image
    return Split(image[owner].contiguous(), text, data.image_ids[owner], data.labels[owner])


def load_features(name: str, data_dir: Path, log=print) -> tuple[Split, Split]:
    """(train, test) features of one set, from the cache under data_dir when it matches the shards and towers."""
    from fne_dist.model import build_towers

    shards = data_dir / name
    manifest = build_shards(name, shards)
    section = tower_section()
    key = {"version": CACHE_VERSION, "manifest": manifest["source"], "towers": repr(section)}
    cache = data_dir / f"features-{name}.pt"
    if cache.is_file():
        stored = torch.load(cache, weights_only=True)
        if stored["key"] == json.dumps(key, sort_keys=True):
            log(f"{name}: cached features {cache}")
            return Split(**stored["train"]), Split(**stored["test"])
    start = time.perf_counter()
    torch.set_num_threads(2)
    towers = build_towers(section)
    splits = {split: split_features(towers, str(shards / manifest["splits"][split]["pattern"]))
              for split in ("train", "test")}
    torch.save({"key": json.dumps(key, sort_keys=True),
                **{split: vars(s) for split, s in splits.items()}}, cache)
    log(f"{name}: features of {len(splits['train'].ids)} train and {len(splits['test'].ids)} test pairs in "
        f"{time.perf_counter() - start:.0f} s -> {cache}")
    return splits["train"], splits["test"]
