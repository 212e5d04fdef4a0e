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
                    "--val-fraction", "0", "--workers", "1", "--quiet"]) == 0
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


def test_val_split_is_by_group_and_leaves_test_as_it_was():
    many = [g // 3 for g in range(300)] + [100 + g // 7 for g in range(140)]  # groups of 3 and of 7
    for seed in range(5):
        splits = recipes.split_by_group(many, {"test": 0.2, "val": 0.1}, seed)
        by_group = defaultdict(set)
        for g, s in zip(many, splits):
            by_group[g].add(s)
        assert all(len(s) == 1 for s in by_group.values())
        assert 88 <= splits.count("test") < 88 + 7 and 44 <= splits.count("val") < 44 + 7 + 7
        without_val = recipes.split_by_group(many, 0.2, seed)
        assert [s == "test" for s in splits] == [s == "test" for s in without_val]
    with pytest.raises(ValueError, match="sum to less than 1"):
        recipes.split_by_group(many, {"test": 0.5, "val": 0.5}, 0)


def test_cli_writes_train_val_test_and_shares_thumbnails(tmp_path, capsys):
    thumbs = tmp_path / "thumbs"
    assert ms.main(["openclipart-alt", "--root", str(DATA), "--out", str(tmp_path / "alt"), "--thumbnails",
                    str(thumbs), "--test-fraction", "0.4", "--val-fraction", "0.2", "--workers", "1",
                    "--quiet"]) == 0
    rows = shard_rows(tmp_path / "alt")
    assert sorted(rows) == ["test", "train", "val"] and sum(map(len, rows.values())) == 5
    assert len(list((thumbs / "openclipart").glob("*.png"))) == 5 and not (tmp_path / "alt" / "thumbnails").exists()
    assert ms.main(["emoji-alias", "--out", str(tmp_path / "bad"), "--val-fraction", "0.9", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fne-make-shards: error: split fractions --test-fraction 0.2 and --val-fraction 0.9 must be "
                   "positive and sum to less than 1 (the rest is train)"]


def test_openclipart_alt_phrases_titles_and_keeps_groups(tmp_path):
    thumbs = tmp_path / "thumbs"
    plain = recipes.build("openclipart", tmp_path / "a", test_fraction=0.4, seed=0, root=DATA, thumbnail_dir=thumbs)
    made = sorted(p.name for p in (thumbs / "openclipart").iterdir())
    alt = recipes.build("openclipart-alt", tmp_path / "b", test_fraction=0.4, seed=0, root=DATA,
                        thumbnail_dir=thumbs)
    assert sorted(p.name for p in (thumbs / "openclipart").iterdir()) == made  # the same images, stored once
    rows = {r[2]: r for split in plain.splits.values() for r in split}
    alt_rows = {r[2]: r for split in alt.splits.values() for r in split}
    assert rows.keys() == alt_rows.keys()
    for image_id, (path, title, _, group) in rows.items():
        alt_path, caption, _, alt_group = alt_rows[image_id]
        assert alt_path == path and alt_group == group  # same images, same groups (same titles)
        assert caption in [t.format(x=title) for t in recipes.ALT_TEMPLATES]
    # each drawing draws its phrasing, seeded by its name: the two "armenia" drawings (one group) differ here
    armenia = sorted(c for _, c, _, _ in alt_rows.values() if "armenia" in c)
    assert armenia == ["a simple graphic of armenia", "cartoon armenia"]
    again = recipes.build("openclipart-alt", tmp_path / "c", test_fraction=0.4, seed=1, root=DATA,
                          thumbnail_dir=thumbs)
    assert {r[2]: r[1] for split in again.splits.values() for r in split} == {k: r[1] for k, r in alt_rows.items()}


@pytest.mark.skipif(not Path(recipes.EMOJI_FONT).is_file(),
                    reason="fonts-noto-color-emoji is not installed (apt-get install fonts-noto-color-emoji)")
def test_emoji_recipe_exact(tmp_path):
    chars = ["👍", "👍🏽", "👍🏿", "🐈", "🇺🇸", "🧑\u200d🩰"]  # the font has no ballet-dancer glyph
    built = recipes.build("emoji", tmp_path, test_fraction=0.4, seed=0, chars=chars)
    rows = {split: [(caption, group) for _, caption, _, group in r] for split, r in built.splits.items()}
    captions = sorted(c for r in rows.values() for c, _ in r)
    assert captions == ["cat", "flag United States", "thumbs up", "thumbs up dark skin tone",
                        "thumbs up medium skin tone"]
    # each caption names its skin tone: no caption fits another tone's image, so every emoji is its own group
    assert len({g for r in rows.values() for _, g in r}) == 5
    assert built.summary["dropped"] == {"not one glyph in the font": 1}
    with Image.open(built.splits["train"][0][0]) as image:
        assert image.size == (136, 136) and image.mode == "RGB"


@pytest.mark.skipif(not Path(recipes.EMOJI_FONT).is_file(),
                    reason="fonts-noto-color-emoji is not installed (apt-get install fonts-noto-color-emoji)")
def test_emoji_alias_groups_tone_variants_under_tone_free_captions(tmp_path):
    # "☝️" carries U+FE0F, its toned variant does not: one group all the same
    chars = ["👍", "👍🏽", "👍🏿", "☝️", "☝🏽", "🐈", "🧑\u200d🤝\u200d🧑", "🧑🏻\u200d🤝\u200d🧑🏿"]
    built = recipes.build("emoji-alias", tmp_path, test_fraction=0.3, seed=0, chars=chars)
    rows = [r for split in built.splits.values() for r in split]
    by_group = defaultdict(list)
    for _, caption, _, group in rows:
        by_group[group].append(caption)
    phrasings = {"thumbs up": {"thumbs up", "thumbsup"}, "index pointing up": {"index pointing up", "point up"},
                 "cat": {"cat"}, "people holding hands": {"people holding hands"}}
    assert len(by_group) == 4 and sorted(map(len, by_group.values())) == [1, 2, 2, 3]
    for captions in by_group.values():
        name = next(n for n in phrasings if any(p in c for c in captions for p in phrasings[n]))
        fits = {t.format(x=p) for t in recipes.EMOJI_TEMPLATES for p in phrasings[name]}
        assert set(captions) <= fits and "skin tone" not in " ".join(captions)
    assert len({c for _, c, _, _ in rows}) == len(rows)  # the members of a group are phrased apart here
    # 8 images, test 2.4 of them: a val share of 0.08 images still takes one whole group, never an empty split
    small_val = recipes.build("emoji-alias", tmp_path, test_fraction=0.3, val_fraction=0.01, seed=0, chars=chars)
    assert sorted(small_val.splits) == ["test", "train", "val"] and all(small_val.splits.values())
