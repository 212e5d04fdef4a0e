"""The study's data: the real captioned sets (`fne-make-shards openclipart | emoji | openclipart-alt |
emoji-alias`), or any shard folder whose pairs carry a group label, and the frozen pretrained towers' pooled
features of every pair, computed once and cached; the train / validation / test splits by group (`study_splits`).

The towers are the pretrained EfficientNet-Lite0 image trunk and MiniLM-L6 text trunk from local wheels, frozen
(fne_dist.pretrained), images at the towers' size through the tower's own evaluation transform.  The feature cache
holds image features by image content (the transformed pixels) and text features by caption (its tokens), for the
towers' settings it records: sets of the same images with other captions (openclipart-alt, emoji-alias) compute
only their new captions, and the image tower (8-26 images/s on a 2-core CPU) runs once per image.  It also indexes
the shards it has read by their bytes, so that a later run reads an unchanged set's features without decoding it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fne_dist.config import ImageTowerSection, ModelSection, TextTowerSection
from fne_dist.data.loader import expand_urls, load_eval_set
from fne_dist.data.shards import read_manifest

DATASETS = ("openclipart", "emoji", "openclipart-alt", "emoji-alias")
FEATURE_BATCH = 64
CACHE_VERSION = 2
CACHE_FILE = "features-cache.pt"
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


def build_shards(name: str, out: Path, thumbnails: Path) -> dict:
    """The shards of one set (idempotent: an existing complete build is kept); returns the manifest."""
    from fne_dist.data.make_shards import main as make_shards

    if read_manifest(out) is None:
        code = make_shards([name, "--out", str(out), "--thumbnails", str(thumbnails), "--quiet"])
        if code:
            raise RuntimeError(f"fne-make-shards {name} --out {out} failed with exit code {code}")
    return read_manifest(out)


class FeatureCache:
    """Trunk features by content: {"image": {digest of the transformed pixels: features}, "text": {digest of the
    tokens: features}}, valid for one `key` (the towers' settings); a file of another key starts empty.  `shards`
    indexes shard sets already read, by the digest of their files' bytes: each pair's image and caption digests,
    ids and groups, so that unchanged shards are not decoded again (hashing their bytes is a fraction of a second,
    decoding and transforming their images 6-21 s a set on a 2-core CPU)."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self.features: dict[str, dict[str, torch.Tensor]] = {"image": {}, "text": {}}
        self.shards: dict[str, dict] = {}
        self.changed = False  # features or an index added since the file was read
        if path.is_file():
            stored = torch.load(path, weights_only=True)
            if stored["key"] == key:
                self.features = {kind: dict(zip(stored[f"{kind}_digests"], stored[kind])) for kind in self.features}
                self.shards = stored.get("shards", {})

    def add(self, kind: str, inputs: torch.Tensor, compute) -> tuple[list[str], int]:
        """The digests of the rows of `inputs`, whose features (`lookup`) are then cached: `compute` runs, in
        batches, on the rows not cached yet; and how many rows it computed."""
        digests = [hashlib.blake2b(row.contiguous().numpy().tobytes(), digest_size=16).hexdigest() for row in inputs]
        known = self.features[kind]
        missing = sorted({d: i for i, d in enumerate(digests) if d not in known}.values())
        if missing:
            known.update(zip((digests[i] for i in missing), _in_batches(compute, inputs[missing])))
            self.changed = True
        return digests, len(missing)

    def indexed(self, shards_digest: str | None) -> dict | None:
        """The index of shards already read (see `shards`), if every feature it names is cached."""
        index = self.shards.get(shards_digest) if shards_digest else None
        if index is None or not all(d in self.features[kind] for kind in ("image", "text") for d in index[kind]):
            return None
        return index

    def remember(self, shards_digest: str | None, index: dict) -> None:
        if shards_digest is not None:
            self.shards[shards_digest] = index
            self.changed = True

    def lookup(self, kind: str, digests: list[str]) -> torch.Tensor:
        return torch.stack([self.features[kind][d] for d in digests])

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".partial")
        torch.save({"key": self.key, **{f"{kind}_digests": list(f) for kind, f in self.features.items()},
                    **{kind: torch.stack(list(f.values())) if f else torch.empty(0) for kind, f in
                       self.features.items()}, "shards": self.shards}, tmp)
        tmp.replace(self.path)


def shards_digest(pattern: str) -> str | None:
    """A digest of the shard files' bytes, in order (None where a shard is not a local file: read every time)."""
    digest = hashlib.blake2b(digest_size=16)
    for url in expand_urls(pattern):
        path = Path(url.removeprefix("file://"))
        if not path.is_file():
            return None
        with path.open("rb") as f:  # in chunks: a shard may be gigabytes
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


@torch.no_grad()
def _in_batches(fn, inputs: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(inputs[i:i + FEATURE_BATCH]) for i in range(0, len(inputs), FEATURE_BATCH)])


def split_features(towers, pattern: str, cache: FeatureCache) -> tuple[Split, int, int]:
    """Every pair of the shards: image trunk features (each image once), text trunk features, image id, group (the
    shards' label); and how many image and caption features were computed rather than read from the cache.  Shards
    the cache has indexed (the same bytes) are not decoded, and `towers()` (built on first call) is not called."""
    from fne_dist.pretrained import text_trunk_features, trunk_features

    digest = shards_digest(pattern)
    index = cache.indexed(digest)
    new_images = new_texts = 0
    if index is None:
        built = towers()
        data = load_eval_set(pattern, preprocess=built.preprocess_val, tokenizer=built.tokenizer)
        model = built.model.eval()
        image_digests, new_images = cache.add("image", data.images, lambda x: trunk_features(model, x))
        text_digests, new_texts = cache.add("text", data.tokens, lambda t: text_trunk_features(model, t))
        index = {"image": image_digests, "text": text_digests, "text_to_image": data.text_to_image,
                 "image_ids": data.image_ids, "labels": data.labels}
        cache.remember(digest, index)
    owner = index["text_to_image"]
    image, text = cache.lookup("image", index["image"]), cache.lookup("text", index["text"])
    split = Split(image[owner].contiguous(), text, index["image_ids"][owner], index["labels"][owner])
    return split, new_images, new_texts


def load_features(name: str, data_dir: Path, log=print) -> dict[str, Split]:
    """train, val and test features of one of the study's sets (its shards built on first use under data_dir,
    images in one thumbnail folder for every set) through the feature cache under data_dir."""
    build_shards(name, data_dir / name, data_dir / "thumbnails")
    return shard_features(data_dir / name, data_dir / CACHE_FILE, log)


def shard_features(shards: Path, cache_file: Path, log=print) -> dict[str, Split]:
    """train, val and test features of a shard folder (`study_splits`), through the feature cache in cache_file
    (shared by every set: only images and captions it has not seen are computed)."""
    from fne_dist.model import build_towers

    manifest = read_manifest(shards)
    if manifest is None:
        raise ValueError(f"{shards}: no manifest.json; make the shards with fne-make-shards (e.g. table FILE "
                         f"--label-column GROUP_COLUMN --out {shards})")
    section = tower_section()
    start = time.perf_counter()
    torch.set_num_threads(2)
    towers = functools.cache(lambda: build_towers(section))  # built only if some shards are not indexed yet
    cache = FeatureCache(cache_file, json.dumps({"version": CACHE_VERSION, "towers": repr(section)}))
    splits, new_images, new_texts = {}, 0, 0
    for split, info in manifest["splits"].items():
        splits[split], images, texts = split_features(towers, str(shards / info["pattern"]), cache)
        new_images, new_texts = new_images + images, new_texts + texts
    if cache.changed:
        cache.save()
    log(f"{shards.name}: {', '.join(f'{len(s.ids)} {split}' for split, s in splits.items())} pairs; computed "
        f"{new_images} image and {new_texts} caption features ({time.perf_counter() - start:.0f} s), the rest "
        f"from {cache_file}")
    return study_splits(splits, str(shards))
