"""The built-in demo dataset: real handwritten digits with captions, as shards in our layout.

scikit-learn's wheel bundles `load_digits()` (1797 real 8x8 scans of handwritten digits, 10 classes, BSD-3), so the
demo needs no download.  Each image gets several captions that name its class in varied words and describe
attributes measured from its pixels (stroke weight, slant from image moments, width, horizontal position), each in
tertiles over the whole set.  Text->image retrieval is thus possible (a caption narrows ~1800 images down to a few
dozen) while many images share a caption's description: false negatives are plentiful, which is what FNE is about.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from fne_dist.data.shards import ShardSample, is_complete, make_manifest, shard_name, write_manifest, write_shard

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CLASS_PHRASES = ("the digit {name}", "a handwritten {digit}", "the number {name}", "a scanned {name}",
                 "a hand-drawn digit {digit}")
TEMPLATES = ("{cls} {a}, {b}", "{cls}, {a} and {b}", "an image of {cls} {a} and {b}", "{cls} {a}; {b}")
# attribute -> its three tertile levels (low, middle, high) -> varied phrasings of each level
ATTRIBUTES = {
    "ink": (("with thin strokes", "in a light hand", "with faint, thin lines"),
            ("with strokes of medium weight", "in an ordinary pen weight", "with lines of normal thickness"),
            ("with thick strokes", "in heavy, bold ink", "with dark, heavy lines")),
    "slant": (("slanting to the left", "leaning left", "tilted leftwards"),
              ("standing upright", "written straight up", "with no slant"),
              ("slanting to the right", "leaning right", "tilted rightwards")),
    "width": (("that is narrow", "with a narrow shape", "squeezed sideways"),
              ("of average width", "with an ordinary width", "neither wide nor narrow"),
              ("that is wide", "with a broad shape", "stretched out wide")),
    "position": (("sitting left of center", "placed toward the left", "off to the left side"),
                 ("in the middle of the frame", "placed centrally", "centered horizontally"),
                 ("sitting right of center", "placed toward the right", "off to the right side")),
}
SOURCE_VERSION = 1


def measure(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image attribute values [n] from ink images [n, h, w] (ink >= 0): total ink, slant, width, centroid."""
    n, h, w = images.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    mass = images.sum((1, 2))
    cx = (images * xs).sum((1, 2)) / mass
    cy = (images * ys).sum((1, 2)) / mass
    dx = xs[None] - cx[:, None, None]
    dy = ys[None] - cy[:, None, None]
    mu02 = (images * dy**2).sum((1, 2))
    mu11 = (images * dx * dy).sum((1, 2))
    return {"ink": mass,
            "slant": -mu11 / mu02,  # > 0 when the top leans right (rows grow downwards)
            "width": np.sqrt((images * dx**2).sum((1, 2)) / mass),
            "position": cx}


def tertiles(values: np.ndarray) -> np.ndarray:
    """Level 0, 1 or 2 of each value by the set's own tertiles."""
    return np.digitize(values, np.quantile(values, [1 / 3, 2 / 3]))


def captions_for(digit: int, levels: dict[str, int], rng: np.random.Generator, count: int) -> list[str]:
    """`count` distinct captions naming the class and two of the image's attributes, each worded at random."""
    out: list[str] = []
    while len(out) < count:
        cls = CLASS_PHRASES[rng.integers(len(CLASS_PHRASES))].format(name=NAMES[digit], digit=digit)
        a, b = rng.choice(sorted(ATTRIBUTES), size=2, replace=False)
        phrase = {k: ATTRIBUTES[k][levels[k]][rng.integers(3)] for k in (a, b)}
        text = TEMPLATES[rng.integers(len(TEMPLATES))].format(cls=cls, a=phrase[a], b=phrase[b])
        text = text[0].upper() + text[1:] + "."
        if text not in out:
            out.append(text)
    return out


def render(ink: np.ndarray, size: int) -> bytes:
    """Dark ink on white, upscaled to size x size RGB, as PNG bytes."""
    gray = Image.fromarray((255 - ink * (255 / 16)).round().astype(np.uint8), mode="L")
    buf = io.BytesIO()
    gray.resize((size, size), Image.BILINEAR).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def build_demo_shards(out_dir: str | Path, *, image_size: int = 32, captions_per_image: int = 3, n_test: int = 297,
                      shard_size: int = 200, seed: int = 0) -> dict:
    """Write train-*.tar and test-*.tar (+ manifest.json) under out_dir; returns the manifest.

    Idempotent: when out_dir already holds the shards of the same settings, nothing is written.
    """
    from sklearn.datasets import load_digits  # bundled with the wheel: no download

    source = {"builder": "sklearn-load_digits", "version": SOURCE_VERSION, "image_size": image_size,
              "captions_per_image": captions_per_image, "n_test": n_test, "shard_size": shard_size, "seed": seed}
    out_dir = Path(out_dir)
    done = is_complete(out_dir, source)
    if done is not None:
        return done
    digits = load_digits()
    images, targets = digits.images, digits.target
    if not 0 < n_test < len(images):
        raise ValueError(f"n_test={n_test} must leave images for both splits (the set has {len(images)})")
    levels = {k: tertiles(v) for k, v in measure(images).items()}
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    splits = {"train": np.sort(order[n_test:]), "test": np.sort(order[:n_test])}

    def sample(i: int) -> ShardSample:
        level = {k: int(v[i]) for k, v in levels.items()}
        return ShardSample(key=f"{i:06d}", image=render(images[i], image_size), ext="png",
                           captions=captions_for(int(targets[i]), level, rng, captions_per_image),
                           image_id=i, label=int(targets[i]), extra={"attributes": level})

    out_dir.mkdir(parents=True, exist_ok=True)
    shards = {}
    for split, idx in splits.items():
        shards[split] = [write_shard(out_dir / shard_name(split, s), (sample(int(i)) for i in idx[a:a + shard_size]))
                         for s, a in enumerate(range(0, len(idx), shard_size))]
    manifest = make_manifest(source, shards, skipped=[])
    write_manifest(out_dir, manifest)
    return manifest


if __name__ == "__main__":  # python -m fne_dist.data.digits OUT_DIR  (what `make demo` runs first)
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m fne_dist.data.digits OUT_DIR")
    built = build_demo_shards(sys.argv[1])
    for split, info in built["splits"].items():
        print(f"{split}: {info['samples']} images, {info['pairs']} captions -> {Path(sys.argv[1]) / info['pattern']}")
