"""The real-image recipes (fne_dist/recipes.py) through `fne-make-shards openclipart|emoji`: exact pairs, groups and
splits on a handful of real files (tests/data/openclipart: seven drawings copied from Debian's packages; the emoji
font when fonts-noto-color-emoji is installed)."""
import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from fne_dist.data import make_shards as ms
from fne_dist.data import recipes
from fne_dist.data.shards import read_manifest, stable_id

DATA = Path(__file__).resolve().parent / "data" / "openclipart"


def shard_rows(out: Path) -> dict[str, list[tuple[str, dict, Image.Image]]]:
    """split -> [(caption, key.json, image)] in shard order."""
    rows = defaultdict(list)
    for split, info in read_manifest(out)["splits"].items():
        for shard in info["shards"]:
            with tarfile.open(out / shard["name"]) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".txt")):
                key = name[:-4]
                image = Image.open(io.BytesIO(members[f"{key}.png"]))
                rows[split].append((members[name].decode(), json.loads(members[f"{key}.json"]), image))
    return dict(rows)


def test_openclipart_recipe_exact(tmp_path):
    out = tmp_path / "shards"
    assert ms.main(["openclipart", "--root", str(DATA), "--out", str(out), "--test-fraction", "0.4",
                    "--workers", "1", "--quiet"]) == 0
    rows = shard_rows(out)
    pairs = {split: sorted((c, j["image_id"]) for c, j, _ in r) for split, r in rows.items()}
    ids = {rel: stable_id(rel) for rel in ("signs_and_symbols/_armenia_ani_ani_02.png",
                                            "signs_and_symbols/flags/asia/armenia.png",
                                            "special/patterns/pattern-warning-1.png",
                                            "special/patterns/pattern-warning-2.png",
                                            "special/patterns/pattern-warning-5.png")}
    # the symlink links/armenia.png is the same image as flags/asia/armenia.png: stored once; the Flat Icon
    # Collection drawing and "Clipart by Jeff Smith - Christian" carry boilerplate titles and are dropped
    assert pairs == {
        "train": sorted([("warning 1 pattern", ids["special/patterns/pattern-warning-1.png"]),
                         ("warning 2 pattern", ids["special/patterns/pattern-warning-2.png"]),
                         ("warning 2 pattern", ids["special/patterns/pattern-warning-5.png"])]),
        "test": sorted([("armenia", ids["signs_and_symbols/_armenia_ani_ani_02.png"]),
                        ("armenia", ids["signs_and_symbols/flags/asia/armenia.png"])])}
    groups = defaultdict(set)
    for split, r in rows.items():
        for caption, meta, image in r:
            groups[meta["label"]].add((caption, split))
            assert image.size == (224, 224) and image.mode == "RGB"
            assert image.getpixel((0, 0)) == (255, 255, 255)  # transparency composited onto white
    assert sorted(map(sorted, groups.values())) == [[("armenia", "test")], [("warning 1 pattern", "train")],
                                                    [("warning 2 pattern", "train")]]
    summary = json.loads((out / "recipe.json").read_text())
    assert (summary["images"], summary["groups"], summary["images_in_groups_over_1"], summary["dropped"]) == (
        5, 3, 4, {"empty or boilerplate title": 2})


def test_openclipart_on_another_background(tmp_path):
    out = tmp_path / "shards"
    assert ms.main(["openclipart", "--root", str(DATA), "--out", str(out), "--test-fraction", "0.4",
                    "--workers", "1", "--quiet", "--background", "#102030"]) == 0
    images = [image for r in shard_rows(out).values() for _, _, image in r]
    assert len(images) == 5 and all(image.getpixel((0, 0)) == (0x10, 0x20, 0x30) for image in images)
    assert read_manifest(out)["source"]["background"] == [0x10, 0x20, 0x30]
    # cached apart from white's
    assert all(p.stem.endswith("-102030") for p in (out / "thumbnails").iterdir())


def test_boilerplate_titles():
    assert recipes.boilerplate_title("Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)", 1)
    assert recipes.boilerplate_title("Lemon SVG theme", 1) and recipes.boilerplate_title("", 1)
    assert recipes.boilerplate_title("gramastar", 1375)  # a title on that many drawings names a collection
    assert not recipes.boilerplate_title("Stop Sign", 3)


def test_groups_join_keys_and_identical_pixels_and_never_straddle_splits():
    records = [recipes.Record(str(i), "", f"c{i}", key) for i, key in enumerate("aabcdde")]
    digests = ["x", "y", "z", "z", "u", "v", "w"]  # b and c render identically
    groups = recipes.group_ids(records, digests)
    assert groups == [0, 0, 1, 1, 2, 2, 3]
    many = [g // 3 for g in range(300)]
    for seed in range(5):
        splits = recipes.split_by_group(many, 0.2, seed)
        by_group = defaultdict(set)
        for g, s in zip(many, splits):
            by_group[g].add(s)
        assert all(len(s) == 1 for s in by_group.values())
        assert splits.count("test") == 60
    assert recipes.split_by_group(many, 0.2, 0) != recipes.split_by_group(many, 0.2, 1)


@pytest.mark.skipif(not Path(recipes.EMOJI_FONT).is_file(),
                    reason="fonts-noto-color-emoji is not installed (apt-get install fonts-noto-color-emoji)")
def test_emoji_recipe_exact(tmp_path):
    chars = ["👍", "👍🏽", "👍🏿", "🐈", "🇺🇸", "🧑\u200d🩰"]  # the font has no ballet-dancer glyph
    built = recipes.build("emoji", tmp_path, test_fraction=0.4, seed=0, chars=chars)
    rows = {split: [(caption, group) for _, caption, _, group in r] for split, r in built.splits.items()}
    captions = sorted(c for r in rows.values() for c, _ in r)
    assert captions == ["cat", "flag United States", "thumbs up", "thumbs up dark skin tone",
                        "thumbs up medium skin tone"]
    thumbs = {g for r in rows.values() for c, g in r if c.startswith("thumbs up")}
    assert len(thumbs) == 1 and len({g for r in rows.values() for _, g in r}) == 3
    assert {s for s, r in rows.items() for c, _ in r if c.startswith("thumbs up")} in ({"train"}, {"test"})
    assert built.summary["dropped"] == {"not one glyph in the font": 1}
    with Image.open(built.splits["train"][0][0]) as image:
        assert image.size == (136, 136) and image.mode == "RGB"
