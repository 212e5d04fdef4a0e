"""`fne-bench data`: the loader's samples/s per DataLoader worker and in total, to size `data.workers` per GPU.

Shards of real photos (scikit-learn's two bundled photos, cut into distinct random crops, img2dataset's default
256 px) are written as JPEG and as PNG, then read three ways, each with the model's training transform (random
resized crop to the model's image size, normalize):
  decode  one process, one thread: image decode + transform only; the ceiling of one worker;
  local   the trainer's loader (`make_train_loader`) over the local shards with W workers: adds tar reading,
          shuffling, tokenizing and collating (download excluded);
  http    the same loader over a loopback HTTP server (download included: the transfer and the remote reader);
          `--url` measures a real source instead (its shards must hold what the loader reads).
Rates exclude the workers' start: timing starts once every worker delivered its first batch.  Prints a table and
appends the rows to a CSV.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import io
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from PIL import Image

from fne_dist.bench.common import append_csv, print_table
from fne_dist.config import ModelSection
from fne_dist.data.loader import SkipCounter, _decode_image, _read_pairs, make_train_loader
from fne_dist.data.remote import Fetch
from fne_dist.data.shards import ShardSample, shard_name, write_shard

FIELDS = ("format", "source_px", "image_px", "path", "workers", "samples_s", "per_worker_s", "kb_per_sample")
CAPTION = "a photo of a small part of a larger scene, cropped and resized"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="fne-bench data", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name or model-config JSON: its image "
                                                            "size and transform (default ViT-B-32, 224 px)")
    parser.add_argument("--formats", default="jpeg,png", help="image formats of the shards")
    parser.add_argument("--source-size", type=int, default=256, help="stored image side in px (img2dataset: 256)")
    parser.add_argument("--samples", type=int, default=768, help="samples per format (in 8 shards), and per timed "
                                                                 "loader run")
    parser.add_argument("--workers", default="1,2", help="DataLoader workers to try, comma separated")
    parser.add_argument("--batch", type=int, default=32, help="loader batch size")
    parser.add_argument("--url", help="a remote shard pattern to time instead of the loopback server")
    parser.add_argument("--csv", default="runs/bench/data.csv", help="CSV to append the result rows to")
    return parser.parse_args(argv)


def photo_crops(n: int, size: int, seed: int = 0):
    """n distinct size x size RGB crops of scikit-learn's bundled photos (random box, aspect and flip)."""
    from sklearn.datasets import load_sample_images  # bundled with the wheel: no download

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = random.Random(seed)
    for _ in range(n):
        photo = rng.choice(photos)
        w, h = photo.size
        side = rng.uniform(0.3, 1.0) * min(w, h)
        cw, ch = min(w, side * rng.uniform(0.8, 1.25)), side
        x, y = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        crop = photo.crop((int(x), int(y), int(x + cw), int(y + ch))).resize((size, size), Image.BICUBIC)
        yield crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def write_photo_shards(folder: Path, fmt: str, n: int, size: int, n_shards: int = 8) -> tuple[list[str], float]:
    """n samples in n_shards shards of `fmt` images; returns the shard paths and the mean image size in KiB."""
    ext = {"jpeg": "jpg", "png": "png"}[fmt]
    encoded = []
    for image in photo_crops(n, size):
        buf = io.BytesIO()
        image.save(buf, format=fmt.upper(), **({"quality": 95} if fmt == "jpeg" else {}))  # img2dataset's quality
        encoded.append(buf.getvalue())
    paths = []
    per = -(-n // n_shards)
    for s in range(n_shards):
        path = folder / shard_name(fmt, s)
        write_shard(path, [ShardSample(f"{i:06d}", encoded[i], ext, [CAPTION], image_id=i)
                           for i in range(s * per, min(n, (s + 1) * per))])
        paths.append(str(path))
    return paths, statistics.mean(map(len, encoded)) / 1024


def decode_rate(paths: list[str], preprocess) -> float:
    """Samples/s of image decode + transform in this process on one thread (what one worker can at most do)."""
    pairs = list(_read_pairs(paths, SkipCounter(), Fetch()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for pair in pairs:
            preprocess(_decode_image(pair.image))
        return len(pairs) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def loader_rate(urls, towers, *, batch: int, workers: int, pairs: int) -> float:
    """Samples/s of the trainer's loader once every worker delivered its first batch."""
    run = make_train_loader(urls, preprocess=towers.preprocess_train, tokenizer=towers.tokenizer, batch_size=batch,
                            seed=0, epoch=0, rank=0, world_size=1, shuffle_buffer=batch, num_workers=workers,
                            epoch_pairs=pairs)
    started, count = None, 0
    for i, _ in enumerate(run, start=1):
        if i == max(1, workers):
            started = time.perf_counter()
        elif started is not None:
            count += batch
    if not count:
        raise SystemExit(f"too few samples to time {workers} workers: raise --samples")
    return count / (time.perf_counter() - started)


class LoopbackServer(http.server.ThreadingHTTPServer):
    """The shard folder over HTTP on 127.0.0.1, for the 'download included' rows."""

    daemon_threads = True

    def __init__(self, folder: Path):
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def urls(self, paths: list[str]) -> list[str]:
        return [f"http://127.0.0.1:{self.server_address[1]}/{Path(p).name}" for p in paths]


def run(args) -> list[dict]:
    from fne_dist.model import build_towers

    towers = build_towers(ModelSection(name=args.model))
    image_px = towers.model.visual.image_size
    image_px = image_px[0] if isinstance(image_px, tuple) else image_px
    workers = [int(w) for w in args.workers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fne-bench-data-") as tmp:
        folder = Path(tmp)
        server = LoopbackServer(folder)
        try:
            for fmt in args.formats.split(","):
                paths, kib = write_photo_shards(folder, fmt, args.samples, args.source_size)
                base = {"format": fmt, "source_px": args.source_size, "image_px": image_px,
                        "kb_per_sample": round(kib, 1)}
                rate = decode_rate(paths, towers.preprocess_train)
                rows.append(base | {"path": "decode", "workers": 1, "samples_s": rate, "per_worker_s": rate})
                sources = {"local": paths, "http": server.urls(paths)}
                if args.url:
                    sources = {"local": paths, "url": args.url}
                for path, urls in sources.items():
                    for w in workers:
                        rate = loader_rate(urls, towers, batch=args.batch, workers=w, pairs=args.samples)
                        rows.append(base | {"path": path, "workers": w, "samples_s": rate,
                                            "per_worker_s": rate / max(1, w)})
        finally:
            server.shutdown()
            server.server_close()
    for row in rows:
        row["samples_s"], row["per_worker_s"] = round(row["samples_s"], 1), round(row["per_worker_s"], 1)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = run(args)
    print_table(rows, FIELDS)
    append_csv(rows, FIELDS, args.csv)
