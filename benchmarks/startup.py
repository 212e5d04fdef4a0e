"""Start-up times of a newcomer's first commands (issue 25), on a generated set of transparent icons.

    python benchmarks/startup.py --out runs/startup [--images 200]

makes the set (`make_icon_set`), its shards with a grouped split (`fne-make-shards table`), then times, twice
each (cold: the first run after the shards and the model's caches were made, as a fresh user meets it; warm: the
same command again), `fne-train` with configs/pretrained_lite0_minilm.yaml to its first logged step (one epoch,
log_every=1) and `fne-eval` on the test split to its result; also when each printed its first line.  Appends
one row per run to `--out`/startup.csv with the machine, the date and the load average.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import random
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "orange": (240, 150, 30),
           "purple": (140, 60, 180), "black": (20, 20, 20), "teal": (30, 150, 150), "pink": (240, 120, 180)}
SHAPES = ("circle", "square", "triangle", "diamond")


def make_icon_set(folder: str | Path, n_images: int = 200, size: int = 64, seed: int = 0) -> Path:
    """`n_images` RGBA PNG icons (a coloured shape on a transparent background, as clip art is stored) in
    folder/icons and folder/captions.csv (columns file, caption); a caption ("a red circle") is shared by several
    icons of different size and place, and every tenth icon has a second caption.  Returns the CSV's path."""
    folder = Path(folder)
    (folder / "icons").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n_images):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        r = rng.randint(size // 6, size // 3)
        x, y = rng.randint(r, size - r), rng.randint(r, size - r)
        box = (x - r, y - r, x + r, y + r)
        draw = ImageDraw.Draw(image)
        fill = COLOURS[colour] + (255,)
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "triangle":
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
        else:
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
        name = f"icons/{i:04d}.png"
        image.save(folder / name)
        rows.append((name, f"a {colour} {shape}"))
        if i % 10 == 0:
            rows.append((name, f"a {'small' if r < size // 4 else 'large'} {colour} {shape} icon"))
    path = folder / "captions.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("file", "caption"), *rows])
    return path


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], stop_at: str | None = None) -> tuple[float, float, float, float, str]:
    """(seconds to the first line of output, seconds to the end or to the first line containing stop_at, the CPU
    seconds the command used (user + system, its worker processes included), the 1-minute load average before it
    started, the output).  On a shared machine the CPU seconds are the figure that other work does not inflate."""
    load, cpu = os.getloadavg()[0], _children_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    first, lines = None, []
    for line in proc.stdout:
        first = first or time.perf_counter() - start
        lines.append(line)
        if stop_at and stop_at in line:
            break
    end = time.perf_counter() - start
    proc.kill()
    proc.wait()
    return first or end, end, _children_cpu() - cpu, load, "".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/startup")
    p.add_argument("--images", type=int, default=200)
    args = p.parse_args()
    out = Path(args.out)
    table = make_icon_set(out / "data", args.images)
    bin_dir = Path(sys.executable).parent
    subprocess.run([bin_dir / "fne-make-shards", "table", table, "--image-column", "file", "--caption-column",
                    "caption", "--val", "0.1", "--test", "0.1", "--out", out / "shards", "--quiet"], check=True)
    run_dir = out / "run"
    train = [bin_dir / "fne-train", "--config", "configs/pretrained_lite0_minilm.yaml", "--overwrite",
             f"data.train={out}/shards/train-*.tar", f"data.val={out}/shards/test-*.tar", "train.epochs=1",
             "train.log_every=1", "train.eval_every=0", f"train.output_dir={run_dir}", "fne.queue_size=128"]
    rows = []
    for when in ("cold", "warm"):
        first, end, cpu, load, text = timed([str(c) for c in train], stop_at="step 1/")
        rows.append(("fne-train: first step", when, first, end, cpu, load))
        print(text[-2000:] if when == "cold" else "", flush=True)
    subprocess.run([str(c) for c in train], check=True, capture_output=True)
    for when in ("cold", "warm"):
        first, end, cpu, load, text = timed([str(bin_dir / "fne-eval"), "--checkpoint", str(run_dir)])
        rows.append(("fne-eval: result", when, first, end, cpu, load))
        print(text, flush=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    machine = f"{platform.machine()} {os.cpu_count()} cores"
    path = out / "startup.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["date_utc", "machine", "images", "what", "run", "first_line_s", "done_s", "cpu_s",
                             "load_avg_1min"])
        for what, when, first, end, cpu, load in rows:
            writer.writerow([stamp, machine, args.images, what, when, f"{first:.1f}", f"{end:.1f}", f"{cpu:.1f}",
                             f"{load:.1f}"])
            print(f"{what:24s} {when}: first line {first:6.1f} s, done {end:6.1f} s, {cpu:6.1f} CPU s "
                  f"(load {load:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
