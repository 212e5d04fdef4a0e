"""fne-make-shards (Karpathy JSON, CSV/TSV/Parquet tables), the shard writer and the demo dataset builder."""
from __future__ import annotations

import contextlib
import io
import json
import tarfile
import time
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fne_dist.data import make_shards as ms
from fne_dist.data.digits import build_demo_shards
from fne_dist.data.shards import count_pairs, read_manifest, stable_id


def save_image(path, seed: int, fmt: str):
    pixels = np.random.default_rng(seed).integers(0, 256, (10, 14, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def read_shard(path) -> list[tuple[str, dict]]:
    """[(key, {ext: bytes or text or parsed json})] in tar order."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            data = tar.extractfile(m).read()
            samples.setdefault(key, {})[ext] = (json.loads(data) if ext == "json" else
                                                data.decode() if ext == "txt" else data)
    return list(samples.items())


@pytest.fixture
def karpathy(tmp_path):
    root = tmp_path / "images"
    save_image(root / "train2014" / "a.jpg", 1, "JPEG")
    save_image(root / "train2014" / "b.png", 2, "PNG")
    save_image(root / "val2014" / "c.bmp", 3, "BMP")  # not kept as is: re-encoded to PNG
    save_image(root / "val2014" / "d.jpg", 4, "JPEG")
    save_image(root / "val2014" / "e.jpg", 5, "JPEG")
    (root / "val2014" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (root / "train2014" / "cut.jpg").write_bytes(save_image(tmp_path / "full.jpg", 6, "JPEG").read_bytes()[:300])

    def img(fp, fn, split, cocoid, captions):
        return {"filepath": fp, "filename": fn, "split": split, "cocoid": cocoid, "imgid": 0,
                "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}

    images = [img("train2014", "a.jpg", "train", 11, ["a one", " a two "]),
              img("train2014", "b.png", "restval", 12, ["b one"]),
              img("train2014", "cut.jpg", "train", 13, ["truncated file"]),
              img("val2014", "c.bmp", "val", 21, ["c one", "c two", "c three"]),
              img("val2014", "d.jpg", "test", 31, ["d one", "d two"]),
              img("val2014", "missing.jpg", "test", 32, ["gone"]),
              img("val2014", "bad.jpg", "test", 33, ["corrupt"]),
              img("val2014", "e.jpg", "test", 34, ["e one", "e two", "e three", "e four", "e five"])]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return path, root


def test_karpathy_shards_exact(karpathy, tmp_path):
    path, root = karpathy
    out = tmp_path / "out"
    assert ms.main(["karpathy", str(path), "--images", str(root), "--out", str(out), "--shard-size", "2",
                    "--workers", "2", "--quiet"]) == 0
    manifest = read_manifest(out)
    summary = {s: (v["samples"], v["pairs"], v["skipped"], v["pattern"]) for s, v in manifest["splits"].items()}
    assert summary == {"train": (2, 3, 1, "train-{000000..000001}.tar"), "val": (1, 3, 0, "val-000000.tar"),
                       "test": (2, 7, 2, "test-{000000..000001}.tar")}
    assert [(s["split"], s["item"].split("/")[-1], s["reason"].split(":")[0]) for s in manifest["skipped"]] == [
        ("train", "cut.jpg", "cannot decode image"), ("test", "missing.jpg", "missing image file"),
        ("test", "bad.jpg", "cannot decode image")]
    assert [s["name"] for s in manifest["splits"]["test"]["shards"]] == ["test-000000.tar", "test-000001.tar"]
    train = read_shard(out / "train-000000.tar") + read_shard(out / "train-000001.tar")
    assert [k for k, _ in train] == ["000000000", "000000001"]  # positions in the split; cut.jpg left none
    (_, a), (_, b) = train
    assert a["txt"] == "a one" and a["json"] == {"image_id": 11, "captions": ["a one", "a two"]}
    assert a["jpg"] == (root / "train2014" / "a.jpg").read_bytes()  # stored once, as it is
    assert b["txt"] == "b one" and b["json"] == {"image_id": 12} and "png" in b  # restval counted as train
    (_, c), = read_shard(out / "val-000000.tar")
    assert set(c) == {"png", "txt", "json"} and Image.open(io.BytesIO(c["png"])).size == (14, 10)
    test = read_shard(out / "test-000000.tar") + read_shard(out / "test-000001.tar")
    assert [(s["json"]["image_id"], len(s["json"]["captions"])) for _, s in test] == [(31, 2), (34, 5)]
    assert count_pairs([str(out / "test-000000.tar"), str(out / "test-000001.tar")]) == 7
    assert not (out / ms.PROGRESS).exists()


def test_restval_own_split(karpathy, tmp_path):
    path, root = karpathy
    items = ms.karpathy_items(path, root, restval_as_train=False)
    assert {s: len(v) for s, v in items.items()} == {"train": 2, "restval": 1, "val": 1, "test": 4}


def test_output_does_not_depend_on_workers(karpathy, tmp_path):
    path, root = karpathy
    items = ms.karpathy_items(path, root)
    one = ms.make_shards(items, tmp_path / "one", source={"t": 1}, shard_size=1, workers=1, progress=False)
    two = ms.make_shards(items, tmp_path / "two", source={"t": 1}, shard_size=1, workers=2, progress=False)
    assert one == two
    names = sorted(p.name for p in (tmp_path / "one").glob("*.tar"))
    assert len(names) == 8
    assert all((tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes() for n in names)


def test_interrupted_run_resumes(karpathy, tmp_path, monkeypatch):
    path, root = karpathy
    items = ms.karpathy_items(path, root)
    out = tmp_path / "out"
    real, calls = ms.build_shard, []

    def failing(out_dir, split, index, first, shard_items, *settings):
        calls.append((split, index))
        if split == "test" and index == 1:
            raise KeyboardInterrupt  # the run is killed half way
        return real(out_dir, split, index, first, shard_items, *settings)

    monkeypatch.setattr(ms, "build_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        ms.make_shards(items, out, source={"t": 1}, shard_size=1, progress=False)
    assert read_manifest(out) is None and (out / ms.PROGRESS).exists()
    first_mtime = (out / "train-000000.tar").stat().st_mtime_ns
    calls.clear()
    monkeypatch.setattr(ms, "build_shard", lambda *a: calls.append(a[1:3]) or real(*a))
    time.sleep(0.01)
    resumed = ms.make_shards(items, out, source={"t": 1}, shard_size=1, progress=False)
    assert calls == [("test", 1), ("test", 2), ("test", 3)]  # only what the first run had not finished
    assert (out / "train-000000.tar").stat().st_mtime_ns == first_mtime
    clean = ms.make_shards(items, tmp_path / "clean", source={"t": 1}, shard_size=1, progress=False)
    assert resumed == clean
    calls.clear()
    assert ms.make_shards(items, out, source={"t": 1}, shard_size=1, progress=False) == clean and not calls
    with pytest.raises(ValueError, match="other inputs or settings"):
        ms.make_shards(items, out, source={"t": 2}, shard_size=1, progress=False)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_tables(tmp_path, fmt):
    for i in range(3):
        save_image(tmp_path / "img" / f"{i}.jpg", i, "JPEG")
    table = pd.DataFrame({"path": ["img/0.jpg", "img/1.jpg", "img/0.jpg", "img/missing.jpg", "img/2.jpg"],
                          "text": ["zero", "one", "zero again", "lost", ""],
                          "cls": [5, 6, 5, 7, 8], "extra": ["x"] * 5})
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "parquet":
        table.to_parquet(path)
    else:
        table.to_csv(path, sep="\t" if fmt == "tsv" else ",", index=False)
    out = tmp_path / "out"
    assert ms.main(["table", str(path), "--image-column", "path", "--caption-column", "text", "--label-column", "cls",
                    "--out", str(out), "--workers", "1", "--quiet"]) == 0
    manifest = read_manifest(out)
    assert (manifest["splits"]["train"]["samples"], manifest["splits"]["train"]["pairs"]) == (2, 3)
    assert [(s["item"].split("/")[-1], s["reason"]) for s in manifest["skipped"]] == [
        ("missing.jpg", "missing image file"), ("2.jpg", "no caption")]
    samples = read_shard(out / "train-000000.tar")
    ids = [stable_id(str(tmp_path / "img" / f"{i}.jpg")) for i in range(2)]
    assert [(k, s["txt"], s["json"]) for k, s in samples] == [
        ("000000000", "zero", {"image_id": ids[0], "label": 5, "captions": ["zero", "zero again"]}),
        ("000000001", "one", {"image_id": ids[1], "label": 6})]
    with_ids = ms.table_items(path, image_column="path", caption_column="text", split="s", id_column="cls")
    assert [item.image_id for item in with_ids["s"]] == [5, 6, 7, 8]


def test_table_without_columns_lists_them(tmp_path, capsys):
    path = tmp_path / "pairs.csv"
    pd.DataFrame({"url": ["a.jpg"], "caption": ["a"]}).to_csv(path, index=False)
    assert ms.main(["table", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no column 'filepath', 'title'" in err and "['url', 'caption']" in err and "--image-column" in err
    with pytest.raises(ValueError, match="unknown table type '.xlsx'"):
        ms.read_table(tmp_path / "pairs.xlsx")


def test_demo_builder(tmp_path):
    manifest = build_demo_shards(tmp_path / "demo")
    splits = manifest["splits"]
    assert (splits["train"]["samples"], splits["train"]["pairs"]) == (1500, 4500)
    assert (splits["test"]["samples"], splits["test"]["pairs"]) == (297, 891)
    assert splits["train"]["pattern"] == "train-{000000..000007}.tar" and splits["test"]["pattern"] == \
        "test-{000000..000001}.tar"
    samples = read_shard(tmp_path / "demo" / "test-000000.tar")
    labels = {s["json"]["label"] for _, s in samples}
    assert labels == set(range(10))
    for _, s in samples[:20]:
        caps = s["json"]["captions"]
        assert len(set(caps)) == 3 and s["txt"] == caps[0]
        assert Image.open(io.BytesIO(s["png"])).size == (32, 32)
    first = (tmp_path / "demo" / "train-000000.tar").stat().st_mtime_ns
    assert build_demo_shards(tmp_path / "demo") == manifest  # idempotent: nothing rewritten
    assert (tmp_path / "demo" / "train-000000.tar").stat().st_mtime_ns == first


def transparent_images(folder):
    """An RGBA PNG, a palette PNG whose transparency is a byte table (Pillow warns when that is converted to RGB),
    an LA PNG and a GIF with a transparent index; each has a fully transparent pixel that stores black, an opaque
    red one and (RGBA, LA) one at alpha 128.  Returns {name: [(pixel, stored RGBA)]}."""
    folder.mkdir(parents=True, exist_ok=True)
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(0, 0, 0, 0), (255, 0, 0, 255), (0, 0, 255, 128)])
    rgba.save(folder / "rgba.png")
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putdata([0, 1])
    pal.save(folder / "palette.png", transparency=bytes([0, 255] + [255] * 254))
    la = Image.new("LA", (3, 1))
    la.putdata([(0, 0), (255, 255), (0, 128)])
    la.save(folder / "la.png")
    gif = Image.new("P", (2, 1))
    gif.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    gif.putdata([0, 1])
    gif.save(folder / "gif.gif", transparency=0)
    return {"rgba.png": [(0, 0, 0, 0), (255, 0, 0, 255), (0, 0, 255, 128)],
            "palette.png": [(0, 0, 0, 0), (255, 0, 0, 255)],
            "la.png": [(0, 0, 0, 0), (255, 255, 255, 255), (0, 0, 0, 128)],
            "gif.gif": [(0, 0, 0, 0), (255, 0, 0, 255)]}


@pytest.mark.parametrize("background,rgb", [(None, (255, 255, 255)), ("black", (0, 0, 0)),
                                            ("#20c040", (0x20, 0xC0, 0x40))])
def test_transparent_images_are_composited_onto_the_background(tmp_path, background, rgb):
    stored = transparent_images(tmp_path / "img")
    names = sorted(stored)
    pd.DataFrame({"filepath": [f"img/{n}" for n in names], "title": names}).to_csv(tmp_path / "t.csv", index=False)
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow warning per image
        assert ms.main(["table", str(tmp_path / "t.csv"), "--out", str(out), "--workers", "1", "--quiet"]
                       + (["--background", background] if background else [])) == 0
    samples = {s["txt"]: s for _, s in read_shard(out / "train-000000.tar")}
    for name in names:
        image = Image.open(io.BytesIO(samples[name]["png"]))
        assert image.mode == "RGB"
        for got, (*colour, alpha) in zip(np.asarray(image).reshape(-1, 3).tolist(), stored[name]):
            want = [c * alpha / 255 + b * (1 - alpha / 255) for c, b in zip(colour, rgb)]
            assert np.abs(np.subtract(got, want)).max() <= 1, (name, got, want)
    plain = save_image(tmp_path / "img" / "plain.png", 0, "PNG")
    assert ms.load_image(str(plain)) == (plain.read_bytes(), "png")  # opaque images are stored as they are


def test_background_must_be_a_colour(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ms.main(["table", "t.csv", "--out", str(tmp_path), "--background", "transparent-ish"])
    assert "'transparent-ish' is not a colour: give a name such as white or black, or #rrggbb" in \
        capsys.readouterr().err


def grouped_table(tmp_path, n_images: int = 60):
    """Images whose captions repeat (a caption on 1-4 images), a few with a second caption that joins two
    caption groups, and a `kind` column that groups more coarsely."""
    rng = np.random.default_rng(0)
    rows, caption = [], 0
    for i in range(n_images):
        save_image(tmp_path / "img" / f"{i}.png", i, "PNG")
        if rng.random() < 0.45:
            caption += 1
        rows.append({"filepath": f"img/{i}.png", "title": f"Icon  number {caption}", "kind": f"k{caption // 3}"})
        if i % 17 == 5:
            rows.append({"filepath": f"img/{i}.png", "title": f"icon number {caption + 1}", "kind": ""})
    table = tmp_path / "pairs.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return table, pd.DataFrame(rows)


def shard_rows(out, split):
    return [s for shard in sorted(out.glob(f"{split}-*.tar")) for _, s in read_shard(shard)]


def test_table_split_keeps_groups_apart(tmp_path):
    table, rows = grouped_table(tmp_path)
    out = tmp_path / "out"
    args = ["table", str(table), "--val", "0.2", "--test", "0.2", "--seed", "3", "--workers", "1", "--quiet",
            "--shard-size", "8"]
    assert ms.main(args + ["--out", str(out)]) == 0
    manifest = read_manifest(out)
    # the reference groups: images joined by a shared caption, case and spacing aside, transitively
    by_caption: dict[str, set] = {}
    for path, title in zip(rows.filepath, rows.title):
        by_caption.setdefault(" ".join(title.lower().split()), set()).add(path)
    groups = [set(paths) for paths in by_caption.values()]
    merged = True
    while merged:
        merged = False
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                if groups[a] & groups[b]:
                    groups[a] |= groups.pop(b)
                    merged = True
                    break
            if merged:
                break
    group_of = {p: n for n, g in enumerate(groups) for p in g}
    path_of = {stable_id(str(tmp_path / p)): p for p in rows.filepath}
    where, labels = {}, {}
    for split in ("train", "val", "test"):
        for s in shard_rows(out, split):
            path = path_of[s["json"]["image_id"]]
            where[path], labels[path] = split, s["json"]["label"]
    assert len(where) == len(set(rows.filepath))
    for g in groups:
        assert len({where[p] for p in g}) == 1, g  # no group straddles two splits
        assert len({labels[p] for p in g}) == 1  # the label is the group
    assert len(set(labels.values())) == len(groups)
    counts = {split: sum(1 for w in where.values() if w == split) for split in ("train", "val", "test")}
    assert abs(counts["val"] - 12) <= 4 and abs(counts["test"] - 12) <= 4
    record = manifest["split"]
    assert record == {"val": 0.2, "test": 0.2, "seed": 3, "group_column": "title", "images": counts,
                      "groups": {split: len({group_of[p] for p, w in where.items() if w == split})
                                 for split in ("train", "val", "test")}}
    assert ms.main(args + ["--out", str(tmp_path / "again")]) == 0  # seeded: the same split again
    assert read_manifest(tmp_path / "again")["splits"] == manifest["splits"]
    args[args.index("--seed") + 1] = "4"
    assert ms.main(args + ["--out", str(tmp_path / "other")]) == 0
    assert {s["txt"] for s in shard_rows(tmp_path / "other", "test")} != {s["txt"] for s in shard_rows(out, "test")}


def test_table_split_by_a_group_column(tmp_path):
    table, rows = grouped_table(tmp_path)
    out = tmp_path / "out"
    assert ms.main(["table", str(table), "--group-column", "kind", "--test", "0.3", "--out", str(out),
                    "--workers", "1", "--quiet"]) == 0
    kind = {title: k for title, k in zip(rows.title, rows.kind) if k}
    sides = {}
    for split in ("train", "val", "test"):
        for s in shard_rows(out, split):
            sides.setdefault(kind[s["txt"]], set()).add(split)
    assert all(len(v) == 1 for v in sides.values()) and read_manifest(out)["split"]["group_column"] == "kind"
    assert sorted(read_manifest(out)["splits"]) == ["test", "train"]  # no val split asked for, none written


@pytest.mark.parametrize("extra,message", [
    (["--val", "0.6", "--test", "0.5"], "must be positive and sum to less than 1"),
    (["--test", "0.99"], "leave no image for train"),
    (["--test", "0.2", "--split", "all"], "leave --split out"),
    (["--test", "0.2", "--group-column", "nope"], "no column 'nope'"),
])
def test_table_split_errors(tmp_path, capsys, extra, message):
    table, _ = grouped_table(tmp_path, n_images=6)
    with contextlib.suppress(SystemExit):
        assert ms.main(["table", str(table), "--out", str(tmp_path / "out"), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "error:" in err and "Traceback" not in err
