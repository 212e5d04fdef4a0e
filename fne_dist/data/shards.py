"""The one place that writes shards in our layout, and reads their manifest.

Layout (img2dataset's, so shards made elsewhere also load): every sample is `key.{jpg,png,webp}` (the image bytes),
`key.txt` (the first caption) and `key.json` holding `image_id` (int), `label` (int class label, present only when
known; used only to measure false negatives) and, when the image has several captions, `captions` (all of them),
so that an image of Flickr30K or COCO is stored once and expands into one pair per caption when read.

A shard is written by one call (`write_shard`), atomically (temporary name, then rename): a shard that exists is
complete, which is what lets an interrupted `fne-make-shards` run resume by skipping the shards it finds.  This is
why we wrap webdataset's `TarWriter` and not its `ShardWriter`: `ShardWriter` rolls over by count inside one
process and finishes (renames) its current shard even when the writer fails half way, whereas one shard per call
gives shards that are identical whatever the number of parallel workers.

Next to the shards, `manifest.json` records per split the shards with their sample (image) and pair (caption)
counts, and the input items that were skipped and why.  The data loader reads it to know how many pairs an
epoch holds.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import webdataset as wds
from PIL import Image

MANIFEST = "manifest.json"
FORMAT = "fne-dist-shards/1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_MTIME = 0.0  # fixed member times: the same input gives byte-identical shards
WHITE = (255, 255, 255)


def flatten(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """The image as RGB with its transparent parts (RGBA, LA, a palette with transparency) composited onto
    `background`: convert("RGB") alone keeps the colour that transparent pixels store, mostly black, so icons and
    clip art would become dark shapes on black (and Pillow warns for each palette image)."""
    if not image.has_transparency_data:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    out = Image.new("RGB", rgba.size, background)
    out.paste(rgba, mask=rgba)
    return out


class DataError(ValueError):
    """Shards, or data settings, that cannot make a run: the message names the problem and the fix (the console
    scripts say it as one error line)."""


@dataclass
class ShardSample:
    """One image with all its captions, as stored in a shard."""

    key: str
    image: bytes
    ext: str
    captions: list[str]
    image_id: int
    label: int = -1
    extra: dict = field(default_factory=dict)

    def encode(self) -> dict:
        """The member dict for webdataset's TarWriter (bytes only, so no encoder of webdataset's is involved)."""
        if self.ext not in IMAGE_EXTS:
            raise ValueError(f"sample {self.key}: image extension {self.ext!r} is not one of {IMAGE_EXTS}")
        if not self.captions:
            raise ValueError(f"sample {self.key}: no caption")
        meta = {**self.extra, "image_id": int(self.image_id)}
        if self.label >= 0:
            meta["label"] = int(self.label)
        if len(self.captions) > 1:
            meta["captions"] = list(self.captions)
        return {"__key__": self.key, self.ext: self.image, "txt": self.captions[0].encode("utf-8"),
                "json": json.dumps(meta, sort_keys=True).encode("utf-8")}


def stable_id(text: str) -> int:
    """A 63-bit id from a string, the same in every process and run (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def split_pattern(split: str, n_shards: int) -> str:
    """Brace pattern of a split's shards, relative to the shard folder, e.g. `train-{000000..000007}.tar`."""
    if n_shards == 1:
        return shard_name(split, 0)
    return f"{split}-{{{0:06d}..{n_shards - 1:06d}}}.tar"


def write_shard(path: str | os.PathLike, samples: Iterable[ShardSample]) -> dict:
    """Write one complete shard atomically; returns {"name", "samples", "pairs"}."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    n_samples = n_pairs = 0
    try:
        with wds.TarWriter(str(tmp), encoder=False, mtime=_MTIME) as sink:
            for sample in samples:
                sink.write(sample.encode())
                n_samples += 1
                n_pairs += len(sample.captions)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"name": path.name, "samples": n_samples, "pairs": n_pairs}


def make_manifest(source: dict, shards: dict[str, list[dict]], skipped: list[dict]) -> dict:
    """Manifest from the shards written per split (as returned by write_shard) and the skipped items.

    skipped: [{"split", "item", "reason"}]; `source` says what built the shards and with which settings, so that a
    rerun can tell whether the folder already holds what it would build.
    """
    splits = {}
    for split, infos in shards.items():
        infos = sorted(infos, key=lambda s: s["name"])
        splits[split] = {
            "pattern": split_pattern(split, len(infos)),
            "shards": infos,
            "samples": sum(s["samples"] for s in infos),
            "pairs": sum(s["pairs"] for s in infos),
            "skipped": sum(1 for s in skipped if s["split"] == split),
        }
    return {"format": FORMAT, "source": source, "splits": splits, "skipped": skipped}


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> Path:
    path = Path(out_dir) / MANIFEST
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The manifest of a shard folder, or None when there is none."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise DataError(f"{path} is not valid JSON ({err}): move it away, or rebuild the shards with "
                        "fne-make-shards") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise DataError(f"{path}: not a manifest of ours (format {found!r}, expected {FORMAT!r}): move it away, "
                        "or rebuild the shards with fne-make-shards")
    return manifest


def is_complete(out_dir: str | os.PathLike, source: dict) -> dict | None:
    """The manifest if out_dir already holds every shard built from `source`, else None."""
    manifest = read_manifest(out_dir)
    if manifest is None or manifest["source"] != source:
        return None
    for split in manifest["splits"].values():
        if not all((Path(out_dir) / s["name"]).is_file() for s in split["shards"]):
            return None
    return manifest


def count_pairs(urls: list[str]) -> int | None:
    """Pairs (captions) in these shards according to their folders' manifests; None if any shard is not listed."""
    per_dir: dict[Path, dict[str, int]] = {}
    total = 0
    for url in urls:
        path = Path(url)
        if path.parent not in per_dir:
            manifest = read_manifest(path.parent) if path.parent.is_dir() else None
            per_dir[path.parent] = {} if manifest is None else {
                s["name"]: s["pairs"] for split in manifest["splits"].values() for s in split["shards"]}
        if path.name not in per_dir[path.parent]:
            return None
        total += per_dir[path.parent][path.name]
    return total
