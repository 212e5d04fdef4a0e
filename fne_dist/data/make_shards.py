"""fne-make-shards: local images + captions -> WebDataset shards in our layout, in parallel and resumable.

Four inputs:
  karpathy  Karpathy's split JSON (dataset_flickr30k.json, dataset_coco.json: images[] with filename, optional
            filepath, split, sentences[].raw, imgid and, for COCO, cocoid) plus the image folder; one shard set per
            split, each image stored once with all its captions.
  table     a CSV, TSV or Parquet table of image path and caption (column names by option, open_clip's defaults),
            e.g. an already-downloaded web-scale table; rows naming the same image become one image with all their
            captions.  `--val 0.1 --test 0.1` split it by group (a group column, the label column, else the caption
            itself), seeded, into train / val / test, so that no group straddles two splits; an image's label is
            its group unless a label column is given.  Downloading from urls is img2dataset's job, whose shards
            the loader reads as they are.
  openclipart, emoji, openclipart-alt, emoji-alias
            real captioned images with known false negatives, built offline from Debian packages by the recipes
            of fne_dist/data/recipes.py: train, val and test splits (by group), label = group id.

Transparent images (RGBA, LA, palettes with transparency) are composited onto `--background` (white by default)
and stored as PNG.  Missing or undecodable images are skipped and listed in the manifest with the reason, never
fatal.  Each shard is one task for the worker pool, so the output does not depend on the number of workers, and a
shard is written atomically and recorded in `progress.jsonl` when done: rerunning an interrupted command skips the
shards it has.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageColor
from tqdm import tqdm

from fne_dist.data import recipes
from fne_dist.data.shards import (WHITE, ShardSample, flatten, is_complete, make_manifest, read_manifest, shard_name,
                                  stable_id, write_manifest, write_shard)

PROGRESS = "progress.jsonl"
SOURCE_VERSION = 1
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as they are; others become PNG


@dataclass(frozen=True)
class Item:
    """One image to store: its file, all its captions, its id, class label (-1: none) and group (-1: none)."""

    path: str
    captions: tuple[str, ...]
    image_id: int
    label: int = -1
    group: int = -1


def karpathy_items(json_path: str | Path, image_root: str | Path,
                   restval_as_train: bool = True) -> dict[str, list[Item]]:
    """Items per split, in the JSON's order (the standard test folds depend on it)."""
    data = json.loads(Path(json_path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_path}: not a Karpathy split file (expected an object with an 'images' list)")
    splits: dict[str, list[Item]] = {}
    for n, entry in enumerate(data["images"]):
        try:
            split = entry["split"]
            image_id = entry.get("cocoid", entry.get("imgid"))
            if not isinstance(image_id, int):
                raise KeyError("cocoid/imgid")
            path = Path(image_root, entry.get("filepath", ""), entry["filename"])
            captions = tuple(s["raw"].strip() for s in entry.get("sentences", []))
        except (KeyError, TypeError, AttributeError) as exn:
            raise ValueError(f"{json_path}: images[{n}] lacks or mistypes {exn} (needs split, filename, integer "
                             "imgid or cocoid, sentences[].raw)") from None
        split = "train" if split == "restval" and restval_as_train else split
        splits.setdefault(split, []).append(Item(str(path), captions, image_id))
    return splits


def read_table(path: str | Path):
    """A CSV (.csv), TSV (.tsv) or Parquet (.parquet) table as a pandas DataFrame."""
    import pandas as pd

    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix in (".csv", ".tsv"):
        return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", keep_default_na=False, dtype=str)
    raise ValueError(f"{path}: unknown table type {suffix!r}; give a .csv, .tsv or .parquet file")


def table_items(table_path: str | Path, *, image_column: str, caption_column: str, split: str = "train",
                image_root: str | Path | None = None, id_column: str | None = None, label_column: str | None = None,
                group_column: str | None = None, val: float = 0.0, test: float = 0.0,
                seed: int = 0) -> dict[str, list[Item]]:
    """One item per distinct image path, in the table's order, with the captions of all its rows.

    Ids come from id_column (integers), else from a stable hash of the image's path (so that the shards of two
    tables never share ids).  Images are grouped by group_column, else label_column, else their captions (case and
    spacing aside): images sharing a value are joined, groups numbered by their first image.  Labels come from
    label_column (empty: -1), else are the group.  With val / test fractions the groups are split (seeded) into
    "train", "val" and "test"; else every item goes to `split`.  Relative paths are taken from image_root, by
    default the table's folder.
    """
    table = read_table(table_path)
    wanted = list(dict.fromkeys(c for c in (image_column, caption_column, id_column, label_column, group_column)
                                if c is not None))
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        raise ValueError(f"{table_path}: no column {', '.join(map(repr, missing))}; it has {list(table.columns)}. "
                         "Name the right ones with --image-column / --caption-column / --id-column / --label-column "
                         "/ --group-column")
    root = Path(table_path).parent if image_root is None else Path(image_root)
    by_column = group_column or label_column
    grouped: dict[str, dict] = {}
    for row in table[wanted].itertuples(index=False, name=None):
        values = dict(zip(wanted, row))
        path = str(root / str(values[image_column]))
        entry = grouped.setdefault(path, {"captions": [], "id": values.get(id_column),
                                          "label": values.get(label_column), "keys": {("image", path)}})
        caption = _cell(values[caption_column])
        entry["captions"].append(caption)
        key = _cell(values[by_column]) if by_column else " ".join(caption.casefold().split())
        if key:
            entry["keys"].add(("group", key))
    groups = recipes.join_groups([entry["keys"] for entry in grouped.values()])
    items = [Item(path, tuple(entry["captions"]),
                  stable_id(path) if id_column is None else _as_int(entry["id"], id_column, table_path, required=True),
                  group if label_column is None else _as_int(entry["label"], label_column, table_path), group)
             for (path, entry), group in zip(grouped.items(), groups)]
    fractions = {name: f for name, f in (("test", test), ("val", val)) if f}
    recipes.check_fractions(fractions, "--{}")
    if not fractions:
        return {split: items}
    where = recipes.split_by_group(groups, fractions, seed)
    out = {name: [item for item, w in zip(items, where) if w == name]
           for name in ("train", "val", "test") if name == "train" or name in fractions}
    empty = [name for name, split_items in out.items() if not split_items]
    if empty:
        raise ValueError(f"{table_path}: {len(items)} images in {len(set(groups))} groups leave no image for "
                         f"{' and '.join(empty)} at --val {val} --test {test}; give more images or other fractions")
    return out


def split_record(items: dict[str, list[Item]], *, val: float, test: float, seed: int, group_column: str) -> dict:
    """What the manifest records of a grouped split: its settings, and the images and groups of each split (before
    any image is skipped)."""
    return {"val": val, "test": test, "seed": seed, "group_column": group_column,
            "images": {name: len(split_items) for name, split_items in items.items()},
            "groups": {name: len({i.group for i in split_items}) for name, split_items in items.items()}}


def _cell(value) -> str:
    """A table cell as stripped text; an empty cell or NaN is ""."""
    return "" if value is None or value != value else str(value).strip()


def recipe_items(built: recipes.Built) -> dict[str, list[Item]]:
    """A recipe's stored images as items: one caption each, label = group id."""
    return {split: [Item(path, (caption,), image_id, group) for path, caption, image_id, group in rows]
            for split, rows in built.splits.items()}


def _as_int(value, column: str, table_path, required: bool = False) -> int:
    if value is None or value == "" or value != value:  # empty cell, NaN
        if required:
            raise ValueError(f"{table_path}: column {column!r} has an empty cell; ids must all be integers")
        return -1
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{table_path}: column {column!r} holds {value!r}, not an integer") from None


class Skip(Exception):
    """An item that cannot be stored; the message is the reason written into the manifest."""


def load_image(path: str, background: tuple[int, int, int] = WHITE) -> tuple[bytes, str]:
    """The image's bytes and extension; JPEG/PNG/WebP kept as they are, other formats and images with transparency
    (composited onto `background`) re-encoded to PNG."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise Skip("missing image file") from None
    except OSError as exn:
        raise Skip(f"unreadable image file: {exn}") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decodes fully: catches truncated files that the header alone would not
            if img.format in _KEEP_FORMATS and not img.has_transparency_data:
                return data, _KEEP_FORMATS[img.format]
            buf = io.BytesIO()
            flatten(img, background).save(buf, format="PNG")
            return buf.getvalue(), "png"
    except Exception as exn:  # any decoder failure: the file is not a usable image
        raise Skip(f"cannot decode image: {exn}") from None


def build_shard(out_dir: str, split: str, index: int, first: int, items: Sequence[Item],
                background: tuple[int, int, int] = WHITE) -> dict:
    """Write one shard of the split's items first, first + 1, ... (their positions are the sample keys: unique
    whatever the ids); returns {"split", "index", "info" (write_shard's), "skipped": [{split, item, reason}]}."""
    skipped = []

    def samples():
        for position, item in enumerate(items, first):
            try:
                captions = [c for c in item.captions if c]
                if not captions:
                    raise Skip("no caption")
                image, ext = load_image(item.path, background)
            except Skip as why:
                skipped.append({"split": split, "item": item.path, "reason": str(why)})
                continue
            yield ShardSample(key=f"{position:09d}", image=image, ext=ext, captions=captions, image_id=item.image_id,
                              label=item.label)

    info = write_shard(Path(out_dir) / shard_name(split, index), samples())
    return {"split": split, "index": index, "info": info, "skipped": skipped}


def _run_task(task: tuple) -> dict:
    return build_shard(*task)


def _read_progress(out_dir: Path, source: dict) -> dict[tuple[str, int], dict]:
    """Shards an interrupted run of the same source finished (and that are still there)."""
    path = out_dir / PROGRESS
    if not path.is_file():
        return {}
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written when the run was killed
            continue
    if not lines or lines[0].get("source") != source:
        raise ValueError(f"{out_dir} holds an interrupted run with other inputs or settings ({path}); "
                         "rerun that command to finish it, or write to an empty --out folder")
    return {(r["split"], r["index"]): r for r in lines[1:] if (out_dir / r["info"]["name"]).is_file()}


def make_shards(items: dict[str, list[Item]], out_dir: str | Path, *, source: dict, shard_size: int = 1000,
                workers: int = 1, progress: bool = True, background: tuple[int, int, int] = WHITE,
                split: dict | None = None) -> dict:
    """Write every split's items as shards of `shard_size` images plus manifest.json; returns the manifest, which
    holds `split` (how the splits were made) when given.

    `source` describes the inputs and settings: a finished run of the same source is not redone, an interrupted
    one resumes, and a folder holding shards of another source is refused rather than mixed.
    """
    if shard_size < 1 or workers < 1:
        raise ValueError(f"need shard_size >= 1 (got {shard_size}) and workers >= 1 (got {workers})")
    out_dir = Path(out_dir)
    done = is_complete(out_dir, source)
    if done is not None:
        return done
    if read_manifest(out_dir) is not None:
        raise ValueError(f"{out_dir} already holds shards made from other inputs or settings; "
                         "write to an empty --out folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    finished = _read_progress(out_dir, source)
    if not finished:
        (out_dir / PROGRESS).write_text(json.dumps({"source": source}, sort_keys=True) + "\n")
    tasks = [(str(out_dir), name, i, a, split_items[a:a + shard_size], background)
             for name, split_items in items.items()
             for i, a in enumerate(range(0, len(split_items), shard_size))]
    pending = [t for t in tasks if (t[1], t[2]) not in finished]
    total = sum(len(t[4]) for t in tasks)
    bar = tqdm(total=total, initial=total - sum(len(t[4]) for t in pending), unit="img",
               desc=f"shards -> {out_dir}", disable=not progress)
    # Workers are spawned, not forked: a fork of a process with running threads (torch's, a caller's) can
    # leave a worker dead on a lock, and ProcessPoolExecutor, unlike multiprocessing.Pool, reports a dead worker.
    pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            if workers > 1 and len(pending) > 1 else None)
    with open(out_dir / PROGRESS, "a") as log, bar:
        try:
            results = (f.result() for f in as_completed([pool.submit(_run_task, t) for t in pending])) if pool \
                else map(_run_task, pending)
            for result in results:
                log.write(json.dumps(result, sort_keys=True) + "\n")
                log.flush()
                finished[(result["split"], result["index"])] = result
                bar.update(result["info"]["samples"] + len(result["skipped"]))
                bar.set_postfix(skipped=sum(len(r["skipped"]) for r in finished.values()))
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)
    ordered = [finished[(t[1], t[2])] for t in tasks]
    shards = {name: [r["info"] for r in ordered if r["split"] == name] for name in items}
    skipped = [s for r in ordered for s in r["skipped"]]
    manifest = make_manifest(source, shards, skipped)
    if split is not None:
        manifest["split"] = split
    write_manifest(out_dir, manifest)
    (out_dir / PROGRESS).unlink()
    return manifest


def _file_source(kind: str, path: str, **settings) -> dict:
    """What identifies a run: the input file (by path and size) and every setting that changes the shards."""
    path = os.path.abspath(path)
    return {"builder": "fne-make-shards", "version": SOURCE_VERSION, "input": kind, "path": path,
            "size": os.path.getsize(path), **settings}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fne-make-shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="input", required=True)
    k = sub.add_parser("karpathy", help="Karpathy split JSON + image folder (Flickr30K, COCO)")
    k.add_argument("json", help="dataset_flickr30k.json / dataset_coco.json")
    k.add_argument("--images", required=True, help="image folder (filepath/filename are taken relative to it)")
    k.add_argument("--restval", choices=("train", "own"), default="train",
                   help="COCO's restval images: add them to train (the usual 113K train set) or keep a restval split")
    t = sub.add_parser("table", help="CSV / TSV / Parquet table of image path and caption")
    t.add_argument("table", help=".csv, .tsv or .parquet")
    t.add_argument("--image-column", default="filepath", help="column of image paths (default: %(default)s)")
    t.add_argument("--caption-column", default="title", help="column of captions (default: %(default)s)")
    t.add_argument("--id-column", help="column of integer image ids (default: a stable hash of the image path)")
    t.add_argument("--label-column", help="column of integer class labels (groups): what measures false negatives, "
                   "and what fne.oracle and the study group by (default: each image's label is its group)")
    t.add_argument("--group-column", help="column whose equal values mark images that captions cannot tell apart "
                   "(default: the label column, else the caption itself)")
    t.add_argument("--image-root", help="folder for relative image paths (default: the table's folder)")
    t.add_argument("--val", type=float, default=0.0, help="share of the images in a val split, whole groups "
                   "(default: %(default)s)")
    t.add_argument("--test", type=float, default=0.0, help="share of the images in a test split, whole groups "
                   "(default: %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="seed of the val / test split (default: %(default)s)")
    t.add_argument("--split", help="split name of the shards when there is no --val / --test (default: train)")
    o = sub.add_parser("openclipart", help="Debian's openclipart drawings with their titles (apt-get install "
                       "openclipart-png openclipart-svg)")
    o.add_argument("--root", default=recipes.OPENCLIPART_ROOT, help="the packages' folder (default: %(default)s)")
    e = sub.add_parser("emoji", help="Noto Color Emoji (apt-get install fonts-noto-color-emoji) with their names")
    oa = sub.add_parser("openclipart-alt", help="openclipart's drawings, captions phrased around the title by "
                        "alt-text templates")
    oa.add_argument("--root", default=recipes.OPENCLIPART_ROOT, help="the packages' folder (default: %(default)s)")
    ea = sub.add_parser("emoji-alias", help="the emoji, captions phrased around the tone-free name or an alias; "
                        "skin-tone variants grouped")
    for q in (o, e, oa, ea):
        q.add_argument("--test-fraction", type=float, default=0.2, help="share of images in test (default: "
                       "%(default)s; whole groups)")
        q.add_argument("--val-fraction", type=float, default=0.1, help="share of images in val (default: "
                       "%(default)s; whole groups; 0: no val split)")
        q.add_argument("--seed", type=int, default=0, help="seed of the split (default: %(default)s)")
        q.add_argument("--thumbnails", help="folder caching the stored images, shared by sets of the same images "
                       "(default: OUT/thumbnails)")
    for q, shard_size in ((k, 1000), (t, 1000), (o, 250), (e, 250), (oa, 250), (ea, 250)):
        q.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
        q.add_argument("--shard-size", type=int, default=shard_size, help="images per shard (default: %(default)s)")
        q.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                       help="parallel processes, one shard each at a time (default: %(default)s)")
        q.add_argument("--quiet", action="store_true", help="no progress bar")
        q.add_argument("--background", type=background_colour, default="white",
                       help="colour that transparent images are composited onto: a name or #rrggbb (default: white)")
    args = p.parse_args(argv)
    if args.input == "table" and (args.val or args.test) and args.split:
        p.error("--split names the one split of a table without --val / --test; with them the splits are "
                "train, val and test: leave --split out")
    return args


def background_colour(text: str) -> tuple[int, int, int]:
    """An RGB triple from a colour name or #rrggbb (Pillow's ImageColor)."""
    try:
        return ImageColor.getrgb(text)[:3]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a colour: give a name such as white or black, "
                                         "or #rrggbb") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    split = None
    try:
        if args.input == "karpathy":
            items = karpathy_items(args.json, args.images, restval_as_train=args.restval == "train")
            source = _file_source("karpathy", args.json, images=os.path.abspath(args.images), restval=args.restval,
                                  shard_size=args.shard_size, background=list(args.background))
        elif args.input in recipes.RECIPES:
            root = {"root": os.path.abspath(args.root)} if hasattr(args, "root") else {}
            built = recipes.build(args.input, args.out, test_fraction=args.test_fraction,
                                  val_fraction=args.val_fraction, seed=args.seed, workers=args.workers,
                                  thumbnail_dir=args.thumbnails, background=args.background, **root)
            items = recipe_items(built)
            # the background is recorded only when not white, so that folders built before the option stay valid
            background = {} if args.background == WHITE else {"background": list(args.background)}
            source = {"builder": "fne-make-shards", "version": SOURCE_VERSION, "input": args.input,
                      "shard_size": args.shard_size, **{k: built.summary[k] for k in (
                          "seed", "test_fraction", "val_fraction", "images", "groups")}, **root, **background}
        else:
            settings = dict(image_column=args.image_column, caption_column=args.caption_column,
                            id_column=args.id_column, label_column=args.label_column, group_column=args.group_column,
                            val=args.val, test=args.test, seed=args.seed, split=args.split or "train")
            items = table_items(args.table, image_root=args.image_root, **settings)
            source = _file_source("table", args.table, **settings, shard_size=args.shard_size,
                                  image_root=os.path.abspath(args.image_root or Path(args.table).parent),
                                  background=list(args.background))
            if args.val or args.test:
                split = split_record(items, val=args.val, test=args.test, seed=args.seed,
                                     group_column=args.group_column or args.label_column or args.caption_column)
        manifest = make_shards(items, args.out, source=source, shard_size=args.shard_size, workers=args.workers,
                               progress=not args.quiet, background=args.background, split=split)
    except (ValueError, OSError) as exn:
        print(f"fne-make-shards: error: {exn}", file=sys.stderr)
        return 2
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['samples']} images, {info['pairs']} pairs, {info['skipped']} skipped -> "
              f"{Path(args.out) / info['pattern']}")
    if args.input in recipes.RECIPES:
        print(f"counts and dropped items: {Path(args.out) / 'recipe.json'}")
    if "split" in manifest:
        groups = manifest["split"]["groups"]
        print(f"split by {manifest['split']['group_column']!r} (seed {manifest['split']['seed']}): "
              + ", ".join(f"{name} {n} groups" for name, n in groups.items()) + "; no group in two splits")
    if manifest["skipped"]:
        print(f"skipped items and why: {Path(args.out) / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
