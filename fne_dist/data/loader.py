"""WebDataset input pipeline for image-text pairs in img2dataset's layout (see fne_dist/data/shards.py).

A sample is `key.{jpg,jpeg,png,webp}` + `key.txt` + optional `key.json` with `image_id`, `label` and `captions`.
Without `image_id` the id is the key's integer value when the key is numeric (img2dataset's keys are), else a
stable 63-bit hash of the key.  With `captions` the sample expands into one pair per caption, all with the same id.

Shards are untrusted input, so only images (JPEG/PNG/WebP, through PIL restricted to those formats), UTF-8 text and
JSON are decoded, by the explicit code below: webdataset's default decoders unpickle some extensions.  Bad input
is skipped, never fatal: unreadable or truncated tars, members missing an image or a caption, bad JSON and images
that do not decode are logged (with the shard's name) and counted by a `SkipCounter`.

Determinism.  The shards of an epoch are shuffled by (seed, epoch) identically on every rank, then split by rank
and by DataLoader worker; each reader (one per rank and worker) shuffles its pairs through a buffer seeded by
(seed, epoch, rank, reader), and the augmentations of the pair at position i of a reader's stream run under a torch
seed derived from the same tuple and i (the trainer's global RNG is left untouched).  So the batches of
(seed, epoch, rank) are the same on every run with the same `num_workers`, and `skip_batches` resumes exactly:
the skipped pairs' images are decoded (so that one the interrupted run dropped as undecodable is dropped again,
uncounted) but not transformed.  (A decodable image whose transform failed would shift a resumed run by a pair.)

Equal batch counts.  All ranks must run the same number of steps.  Every rank yields exactly
`epoch_pairs // (batch_size * world_size)` full batches; `epoch_pairs` defaults to the pairs the shard manifest
lists.  A reader whose shards run out before that starts over on them (reshuffled), and one that has more stops
early, so with unequal shards a few pairs repeat or wait for the next epoch: the same choice as open_clip's.
With `resampled=True` (web scale) each reader draws shards with replacement instead of splitting them.

Remote shards (`pipe:`, `http(s)://`, `s3://`) are opened by fne_dist.data.remote: every wait has a timeout, a failing
shard is reopened where it stopped (bounded retries), and one that still fails is skipped, logged and counted like
a bad tar, so a stalled server costs seconds, never the run.  They have no manifest: `epoch_pairs` gives the length.
"""
from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import multiprocessing
import os
import random
import re
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Sequence

import braceexpand
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fne_dist.data.remote import Fetch, is_remote, open_shards, unsupported_scheme
from fne_dist.data.shards import IMAGE_EXTS, DataError, count_pairs, flatten, stable_id

log = logging.getLogger(__name__)

_PIL_FORMATS = ("JPEG", "PNG", "WEBP")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+:")  # pipe:, s3://, https://, ...


class Batch(NamedTuple):
    images: torch.Tensor  # [b, 3, H, W] float
    tokens: torch.Tensor  # [b, L] long
    ids: torch.Tensor  # [b] long, image ids: equal ids are positives of each other
    labels: torch.Tensor  # [b] long, class labels where known, else -1


@dataclass
class EvalSet:
    """One entry per distinct image id, in the order of first appearance in the shards; all captions kept."""

    images: torch.Tensor  # [I, 3, H, W]
    tokens: torch.Tensor  # [T, L]
    text_to_image: torch.Tensor  # [T] long, row of each caption's image
    image_ids: torch.Tensor  # [I] long
    labels: torch.Tensor  # [I] long
    skipped: int  # bad members skipped while reading


class _Pair(NamedTuple):
    image: bytes  # still encoded: decoding waits until the pair is used
    caption: str
    image_id: int
    label: int
    where: str  # "shard:key", for messages


class SkipCounter:
    """webdataset exception handler that logs what it skips and counts it.

    The count lives in shared memory, so skips inside DataLoader worker processes are counted too (`count`);
    the reasons are in the log of whichever process skipped.
    """

    def __init__(self):
        self._count = multiprocessing.Value("q", 0)
        self.counting = True  # per process: off while a resumed reader passes what the interrupted run counted

    def __call__(self, exn: BaseException) -> bool:
        self.skip(repr(exn))
        return True

    def skip(self, what: str) -> None:
        if self.counting:
            with self._count.get_lock():
                self._count.value += 1
        log.warning("skipped bad shard data: %s", what)

    @property
    def count(self) -> int:
        return self._count.value


def _split_top_level(pattern: str) -> list[str]:
    """Split on `::` and on commas outside braces (commas inside braces are brace alternatives)."""
    parts = []
    for chunk in pattern.split("::"):
        depth, start = 0, 0
        for i, ch in enumerate(chunk):
            depth += (ch == "{") - (ch == "}")
            if ch == "," and depth == 0:
                parts.append(chunk[start:i])
                start = i + 1
        parts.append(chunk[start:])
    return [p.strip() for p in parts if p.strip()]


def expand_urls(pattern: str | Sequence[str]) -> list[str]:
    """Shard urls from brace notation, globs, or a list of them (`,` or `::` separated in a string).

    Local paths must exist: a pattern that matches nothing, or names a shard that is not there, is an error here,
    before training starts, and not an empty or shorter epoch later.  Remote urls (pipe:, http(s)://, s3://) pass
    unchecked (a shard that fails to load is skipped and counted then); a scheme without an opener is an error.
    """
    items = [pattern] if isinstance(pattern, str) else list(pattern)
    parts = [p for item in items for p in _split_top_level(str(item))]
    if not parts:
        raise DataError(f"empty shard pattern {pattern!r}: give shard files, e.g. 'data/train-{{000000..000009}}.tar'")
    urls, missing = [], []
    for part in parts:
        if _SCHEME.match(part) and not part.startswith("file://"):
            problem = unsupported_scheme(part)
            if problem:
                raise DataError(problem)
            urls.extend(braceexpand.braceexpand(part))
            continue
        part = part.removeprefix("file://")
        for path in braceexpand.braceexpand(os.path.expanduser(part)):
            if glob.has_magic(path):
                found = sorted(glob.glob(path))
                urls.extend(found)
                missing.extend([] if found else [path])
            elif os.path.isfile(path):
                urls.append(path)
            else:
                missing.append(path)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(
            f"shard pattern {pattern!r}: {len(missing)} of its files do not exist ({shown}). Fix the path or the "
            "brace range, list only the shards that exist (or use a glob such as 'dir/train-*.tar'), or build the "
            "shards first with fne-make-shards.")
    return urls


def id_from_key(key: str) -> int:
    """The image id of a sample whose json has none: the key's int if numeric, else a stable 63-bit hash."""
    name = key.rsplit("/", 1)[-1]
    if name.isdigit() and int(name) < 2**63:
        return int(name)
    return stable_id(key)


def _sample_pairs(sample: dict, skips: SkipCounter) -> list[_Pair]:
    """The pairs of one tar sample (one per caption), or none (counted) when the sample is unusable."""
    where = f"{sample.get('__url__')}:{sample.get('__key__')}"
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    try:
        if ext is None:
            raise ValueError(f"no image member ({'/'.join(IMAGE_EXTS)})")
        meta = json.loads(sample["json"].decode("utf-8")) if "json" in sample else {}
        if not isinstance(meta, dict):
            raise ValueError("json member is not an object")
        image_id = meta.get("image_id")
        image_id = id_from_key(sample["__key__"]) if image_id is None else image_id
        label = meta.get("label", -1)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (image_id, label)):
            raise ValueError(f"image_id {image_id!r} and label {label!r} must be integers")
        captions = meta.get("captions")
        if captions is None:
            captions = [sample["txt"].decode("utf-8")] if "txt" in sample else []
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise ValueError("json 'captions' must be a list of strings")
        captions = [c.strip() for c in captions]
        if not captions or not all(captions):
            raise ValueError("no caption or an empty one")
    except (ValueError, UnicodeDecodeError) as exn:  # json.JSONDecodeError is a ValueError
        skips.skip(f"{where}: {exn}")
        return []
    return [_Pair(sample[ext], c, image_id, label, where) for c in captions]


def _read_pairs(urls: Sequence[str], skips: SkipCounter, fetch: Fetch) -> Iterator[_Pair]:
    """Pairs of these shards in order, images still encoded; bad tars and members, and remote shards that fail
    after the retries, are skipped and counted.  (webdataset's tarfile_samples with our opener.)"""
    files = wds.tariterators.tar_file_expander(open_shards(urls, fetch, skips), handler=skips)
    for sample in wds.tariterators.group_by_keys(files, handler=skips):
        yield from _sample_pairs(sample, skips)


def _decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as img:
        img.load()
        return flatten(img)


def shards_for_reader(urls: Sequence[str], *, seed: int, epoch: int, rank: int, world_size: int,
                      worker: int = 0, num_workers: int = 1) -> list[str]:
    """The shards one reader (rank, DataLoader worker) reads in an epoch: a (seed, epoch) shuffle common to all
    ranks, split by rank, then by worker, so readers never share a shard."""
    _check_readers(len(urls), world_size, num_workers)
    order = list(urls)
    random.Random(f"fne-shards/{seed}/{epoch}").shuffle(order)
    return order[rank::world_size][worker::max(1, num_workers)]


def _check_readers(n_shards: int, world_size: int, num_workers: int) -> None:
    """Every reader (rank x DataLoader worker) needs a shard of its own."""
    workers = max(1, num_workers)
    if n_shards < world_size * workers:
        fewer = (f"use data.workers={n_shards // world_size} or fewer, " if n_shards >= world_size else "")
        raise DataError(
            f"{n_shards} shards cannot feed {world_size} ranks x {workers} workers = {world_size * workers} readers: "
            f"{fewer}write more, smaller shards (fne-make-shards --shard-size), or sample shards with replacement "
            "(data.resampled=true)")


class _RankStream(IterableDataset):
    """This rank's batches of one epoch; inside DataLoader workers, each worker makes every n-th batch."""

    def __init__(self, urls, *, preprocess, tokenizer, batch_size, seed, epoch, rank, world_size, resampled,
                 shuffle_buffer, num_workers, num_batches, skip_batches, skips, fetch):
        super().__init__()
        self.urls, self.preprocess, self.tokenizer = urls, preprocess, tokenizer
        self.batch_size, self.seed, self.epoch, self.rank, self.world_size = batch_size, seed, epoch, rank, world_size
        self.resampled, self.shuffle_buffer, self.num_workers = resampled, shuffle_buffer, num_workers
        self.num_batches, self.skip_batches, self.skips, self.fetch = num_batches, skip_batches, skips, fetch

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        n_readers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        # The DataLoader interleaves workers round-robin starting at worker 0.  Reader r makes the rank's batches
        # r, r + n, r + 2n, ...; rotating which worker plays which reader by skip_batches makes a resumed loader
        # deliver batch skip_batches first and the rest in order.
        reader = (worker + self.skip_batches) % n_readers
        mine = range(reader, self.num_batches, n_readers)
        skip = len(range(reader, min(self.skip_batches, self.num_batches), n_readers))
        self.skips.counting = False  # the interrupted run counted the bad members before its checkpoint
        pairs = _past_decodable(enumerate(self._pairs(reader, n_readers)), skip * self.batch_size)
        self.skips.counting = True
        yield from itertools.islice(self._batches(pairs, reader), len(mine) - skip)

    def _tag(self, reader: int) -> str:
        return f"{self.seed}/{self.epoch}/{self.rank}/{reader}"

    def _pairs(self, reader: int, n_readers: int) -> Iterator[_Pair]:
        """The reader's shuffled pairs, endless: round after round over its shards (or fresh draws of shards)."""
        for rnd in itertools.count():
            if self.resampled:
                rng = random.Random(f"fne-resample/{self._tag(reader)}/{rnd}")
                shards = rng.choices(self.urls, k=len(self.urls))
            else:
                shards = shards_for_reader(self.urls, seed=self.seed, epoch=self.epoch, rank=self.rank,
                                           world_size=self.world_size, worker=reader, num_workers=n_readers)
            rng = random.Random(f"fne-samples/{self._tag(reader)}/{rnd}")
            n = 0
            shuffle = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)
            for pair in shuffle(_read_pairs(shards, self.skips, self.fetch)):
                n += 1
                yield pair
            if n == 0:
                raise RuntimeError(f"rank {self.rank} reader {reader}: not one readable pair in shards {shards}; "
                                   "see the warnings above for why, and rebuild or drop those shards")

    def _batches(self, pairs: Iterator[tuple[int, _Pair]], reader: int) -> Iterator[Batch]:
        """Full batches of decoded, transformed pairs; pairs whose image does not decode are skipped."""
        base = random.Random(f"fne-augment/{self._tag(reader)}").getrandbits(62)
        items: list[tuple[torch.Tensor, _Pair]] = []
        for position, pair in pairs:
            try:
                image = _decode_image(pair.image)
                with torch.random.fork_rng(devices=[]):
                    # the CPU generator only: torch.manual_seed also queues a lazy seeding of every accelerator,
                    # with a stack trace each time (~1 ms a sample)
                    torch.default_generator.manual_seed(base + position)
                    items.append((self.preprocess(image), pair))
            except Exception as exn:  # any decoder or transform failure on untrusted bytes
                self.skips.skip(f"{pair.where}: image: {exn!r}")
                continue
            if len(items) == self.batch_size:
                yield _collate(items, self.tokenizer)
                items = []


def _past_decodable(pairs: Iterator[tuple[int, _Pair]], count: int) -> Iterator[tuple[int, _Pair]]:
    """The pairs after the first `count` whose image decodes, and after the undecodable ones among them: what the
    skipped batches consumed (they dropped undecodable images and took the next pair).  Positions are kept, so the
    augmentation seeds of what follows are the uninterrupted run's."""
    while count:
        _, pair = next(pairs)
        try:
            _decode_image(pair.image)
        except Exception:  # the batches skipped (and counted) it before the interruption
            continue
        count -= 1
    return pairs


def _collate(items: list[tuple[torch.Tensor, _Pair]], tokenizer: Callable) -> Batch:
    pairs = [p for _, p in items]
    return Batch(images=torch.stack([x for x, _ in items]),
                 tokens=torch.as_tensor(tokenizer([p.caption for p in pairs]), dtype=torch.long),
                 ids=torch.tensor([p.image_id for p in pairs], dtype=torch.long),
                 labels=torch.tensor([p.label for p in pairs], dtype=torch.long))


class TrainLoader:
    """The batches of one rank in one epoch.  len() is the number of batches left to yield (after skip_batches),
    `batches_per_epoch` the full count, `skipped` how many bad members were skipped so far (all workers)."""

    def __init__(self, stream: _RankStream):
        self._stream = stream
        self.batches_per_epoch = stream.num_batches

    def __len__(self) -> int:
        return self._stream.num_batches - self._stream.skip_batches

    @property
    def skipped(self) -> int:
        return self._stream.skips.count

    def __iter__(self) -> Iterator[Batch]:
        if self._stream.num_workers == 0:
            return iter(self._stream)
        return iter(DataLoader(self._stream, batch_size=None, num_workers=self._stream.num_workers,
                               pin_memory=torch.cuda.is_available()))


def epoch_batches(urls: Sequence[str], *, batch_size: int, world_size: int, num_workers: int = 0,
                  resampled: bool = False, epoch_pairs: int | None = None) -> int:
    """Each rank's batches per epoch of these shards (as `expand_urls` gives them), from their list and manifest
    alone: no shard is opened, so a trainer learns before it builds anything whether the shards can feed every
    reader and hold a global batch (a DataError naming the fix if not).  Arguments as for `make_train_loader`."""
    if not resampled:  # fail now, not inside a worker, when there are too few shards
        _check_readers(len(urls), world_size, num_workers)
    counted = ""
    if epoch_pairs is None:
        epoch_pairs = count_pairs(urls)
        counted = " (the manifest's count)"
        if epoch_pairs is None:
            remote = " (remote shards never are)" if any(is_remote(u) for u in urls) else ""
            raise DataError("cannot tell how many pairs an epoch holds: the shards are not listed in a manifest.json "
                            f"of fne-make-shards{remote}; pass epoch_pairs (global pairs per epoch, like open_clip's "
                            "--train-num-samples; in a config: data.epoch_pairs or train.steps_per_epoch)")
    num_batches = epoch_pairs // (batch_size * world_size)
    if num_batches == 0:
        raise DataError(f"epoch_pairs={epoch_pairs}{counted} is less than one global batch ({batch_size} x "
                        f"{world_size} ranks): lower data.batch_size, use fewer ranks, or give more data (more "
                        "shards, data.epoch_pairs, train.steps_per_epoch)")
    return num_batches


def make_train_loader(urls, *, preprocess, tokenizer, batch_size: int, seed: int, epoch: int, rank: int,
                      world_size: int, resampled: bool = False, shuffle_buffer: int = 1000, num_workers: int = 0,
                      epoch_pairs: int | None = None, skip_batches: int = 0, timeout: float = Fetch.timeout,
                      retries: int = Fetch.retries, min_rate: float = Fetch.min_rate) -> TrainLoader:
    """This rank's training batches for `epoch` (see the module docstring for the guarantees).

    urls: shard pattern(s) for expand_urls; preprocess: PIL image -> [3, H, W] tensor (open_clip's train
    transform); tokenizer: list of str -> [n, L] long (open_clip's); epoch_pairs: global pairs per epoch, default
    from the shards' manifest (required for remote shards and shards without one); skip_batches: batches of this
    epoch already done; timeout, retries, min_rate: how remote shards are read (fne_dist.data.remote).
    """
    urls = expand_urls(urls)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if batch_size < 1 or shuffle_buffer < 1 or num_workers < 0:
        raise ValueError(f"need batch_size >= 1 (got {batch_size}), shuffle_buffer >= 1 (got {shuffle_buffer}) "
                         f"and num_workers >= 0 (got {num_workers})")
    num_batches = epoch_batches(urls, batch_size=batch_size, world_size=world_size, num_workers=num_workers,
                                resampled=resampled, epoch_pairs=epoch_pairs)
    if not 0 <= skip_batches <= num_batches:
        raise ValueError(f"skip_batches={skip_batches} is outside this epoch's 0..{num_batches} batches")
    return TrainLoader(_RankStream(
        urls, preprocess=preprocess, tokenizer=tokenizer, batch_size=batch_size, seed=seed, epoch=epoch, rank=rank,
        world_size=world_size, resampled=resampled, shuffle_buffer=shuffle_buffer, num_workers=num_workers,
        num_batches=num_batches, skip_batches=skip_batches, skips=SkipCounter(),
        fetch=Fetch(timeout, retries, min_rate)))


def load_eval_set(urls, *, preprocess, tokenizer, timeout: float = Fetch.timeout,
                  retries: int = Fetch.retries, min_rate: float = Fetch.min_rate) -> EvalSet:
    """All pairs of the shards grouped by image id: images decoded once, every caption kept, in shard order."""
    urls = expand_urls(urls)
    skips = SkipCounter()
    row_of: dict[int, int] = {}
    bad_ids: set[int] = set()
    images, image_ids, labels, captions, owner = [], [], [], [], []
    for pair in _read_pairs(urls, skips, Fetch(timeout, retries, min_rate)):
        if pair.image_id in bad_ids:
            continue
        if pair.image_id not in row_of:
            try:
                images.append(preprocess(_decode_image(pair.image)))
            except Exception as exn:  # any decoder or transform failure on untrusted bytes
                skips.skip(f"{pair.where}: image: {exn!r}")
                bad_ids.add(pair.image_id)
                continue
            row_of[pair.image_id] = len(image_ids)
            image_ids.append(pair.image_id)
            labels.append(pair.label)
        captions.append(pair.caption)
        owner.append(row_of[pair.image_id])
    if not images:
        raise DataError(f"no readable pair in the eval shards {urls}: see the warnings above for why, and fix "
                        "or rebuild the shards data.val names")
    return EvalSet(images=torch.stack(images),
                   tokens=torch.as_tensor(tokenizer(captions), dtype=torch.long),
                   text_to_image=torch.tensor(owner, dtype=torch.long),
                   image_ids=torch.tensor(image_ids, dtype=torch.long),
                   labels=torch.tensor(labels, dtype=torch.long),
                   skipped=skips.count)
