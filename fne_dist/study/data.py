"""The study's data: the two real captioned sets (`fne-make-shards openclipart | emoji`), or any shard folder whose
pairs carry a group label, and the frozen pretrained towers' pooled features of every pair, computed once and
cached; the train / validation / test splits by group (`study_splits`).

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
CACHE_VERSION = 2
STUDY_SPLITS = ("train", "val", "test")
VAL_FRACTION = 0.1  # of the groups, where a set has no validation split
TEST_FRACTION = 0.2  # of the groups, where a set has one split only
SPLIT_SEED = 0


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

    def subset(self, rows: torch.Tensor) -> Split:
        return Split(self.image[rows], self.text[rows], self.ids[rows], self.groups[rows])


def false_negative_density(split: Split) -> float:
    """The chance that a random other pair of the split is a false negative of a pair (its group, another image),
    averaged over pairs: a row of n candidates holds about n times this many."""
    _, group_of, group_size = torch.unique(split.groups, return_inverse=True, return_counts=True)
    _, id_of, id_size = torch.unique(split.ids, return_inverse=True, return_counts=True)
    n = len(split.ids)
    return float((group_size[group_of] - id_size[id_of]).double().mean() / (n - 1)) if n > 1 else 0.0


def split_by_group(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(rest, part): `fraction` of the groups (at least one), drawn with `seed`, in part; every group whole."""
    groups = torch.unique(split.groups)
    take = max(1, round(fraction * len(groups)))
    chosen = groups[torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed))[:take]]
    part = torch.isin(split.groups, chosen)
    return split.subset(~part), split.subset(part)


def study_splits(splits: dict[str, Split], where: str) -> dict[str, Split]:
    """train, val and test: the set's own where it has all three; without val, val carved out of train by group;
    a set of one split (a table's shards) cut into all three by group.  Fixed seeds: every run sees the same."""
    unlabelled = sum(int((s.groups < 0).sum()) for s in splits.values())
    if unlabelled:
        raise ValueError(f"{where}: {unlabelled} pairs have no group label; the study compares by group: make the "
                         "shards with fne-make-shards table ... --label-column GROUP_COLUMN")
    if set(STUDY_SPLITS) <= splits.keys():
        return {name: splits[name] for name in STUDY_SPLITS}
    if {"train", "test"} <= splits.keys():
        train, val = split_by_group(splits["train"], VAL_FRACTION, SPLIT_SEED)
        return {"train": train, "val": val, "test": splits["test"]}
    if len(splits) == 1:
        rest, test = split_by_group(next(iter(splits.values())), TEST_FRACTION, SPLIT_SEED)
        train, val = split_by_group(rest, VAL_FRACTION / (1 - TEST_FRACTION), SPLIT_SEED)
        return {"train": train, "val": val, "test": test}
    raise ValueError(f"{where}: splits {sorted(splits)}; the study needs train and test (val optional), or one split "
                     "to cut by group")


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


def load_features(name: str, data_dir: Path, log=print) -> dict[str, Split]:
    """train, val and test features of one of the study's sets (its shards built on first use under data_dir)."""
    build_shards(name, data_dir / name)
    return shard_features(data_dir / name, data_dir / f"features-{name}.pt", log)


def shard_features(shards: Path, cache: Path, log=print) -> dict[str, Split]:
    """train, val and test features of a shard folder (`study_splits`), from `cache` when it was computed from
    these shards (their manifest) and towers."""
    from fne_dist.model import build_towers

    manifest = read_manifest(shards)
    if manifest is None:
        raise ValueError(f"{shards}: no manifest.json; make the shards with fne-make-shards (e.g. table FILE "
                         f"--label-column GROUP_COLUMN --out {shards})")
    section = tower_section()
    key = json.dumps({"version": CACHE_VERSION, "manifest": manifest["source"], "towers": repr(section)},
                     sort_keys=True)
    if cache.is_file() and (stored := torch.load(cache, weights_only=True))["key"] == key:
        log(f"{shards.name}: cached features {cache}")
        splits = {name: Split(**fields) for name, fields in stored["splits"].items()}
    else:
        start = time.perf_counter()
        torch.set_num_threads(2)
        towers = build_towers(section)
        splits = {name: split_features(towers, str(shards / split["pattern"]))
                  for name, split in manifest["splits"].items()}
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "splits": {name: vars(s) for name, s in splits.items()}}, cache)
        log(f"{shards.name}: features of {', '.join(f'{len(s.ids)} {n}' for n, s in splits.items())} pairs in "
            f"{time.perf_counter() - start:.0f} s -> {cache}")
    return study_splits(splits, str(shards))
