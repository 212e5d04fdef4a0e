"""Real captioned images that install offline, with known false negatives: Debian's openclipart drawings (human
titles) and the Noto color emoji (Unicode names).  `fne-make-shards openclipart|emoji|openclipart-alt|emoji-alias
--out DIR` builds them.

openclipart (public domain; Debian packages openclipart-png + openclipart-svg): every PNG under
/usr/share/openclipart/png, symlinks resolved to unique files, paired with the SVG of the same relative path, whose
RDF metadata (cc:Work) holds the title.  The caption is the title alone: descriptions are missing on two thirds of
the kept drawings and are otherwise often the title again, an e-mail address, a licence note or a paragraph
of history, so they would add noise rather than a second view.  Titles that name a collection rather than the
drawing are dropped (`boilerplate_title`).  Transparency is composited onto white.

emoji (Noto Color Emoji: SIL OFL 1.1; names from the `emoji` package, BSD): every fully-qualified emoji that the
font draws as one glyph, rendered by Pillow at the font's bitmap size 109 (embedded color) onto white; the caption
is its English name ("thumbs up medium skin tone", "flag Japan").

Both are the identical-caption case: group members carry the same text.  Two sets phrase the same images so
that group members carry different captions that fit each other (paraphrases, as web alt-text varies):

openclipart-alt: each drawing's caption is one of ALT_TEMPLATES around its title ("a drawing of {x}", "{x} clip
art", "{x}, vector illustration", ...), drawn per drawing with a fixed seed (`phrased`); groups as openclipart.

emoji-alias: each emoji's caption names it without its skin tone, phrased as one of EMOJI_TEMPLATES ("{x} emoji",
"an emoji of {x}", ...) around its tone-free name or one of the `emoji` package's aliases of it (GitHub/Slack
shortcodes in words, letters only: "thumbsup", "point up"); a group is an emoji and its skin-tone variants.

Groups define false negatives: two images of one group are different images that a caption of either fits.  For
openclipart a group is the drawings whose titles are the same text (case and spacing aside: the MiniLM tokenizer
is uncased); for emoji, whose captions name the skin tone, the emoji whose names are the same text; for
emoji-alias an emoji and its skin-tone variants (the sequence without skin-tone modifiers and without U+FE0F, which
a base emoji such as "☝️" carries and its toned variants do not).  In all, images whose stored pixels are identical
join one group too.  Every image's `label` in the shards is its group id (singletons included), which is what the
trainer compares to count sampled false negatives and the group-aware recall counts as hits.

Splits are by group (seeded): a group lies wholly in one of train, val and test, so no held-out image has a
false-negative twin in train.  Images are stored as PNG squares (the picture fit inside, centred on white):
224 x 224 for openclipart, the emoji's own 136 x 136.  They are cached once in a thumbnails folder (OUT/thumbnails
unless given; sets of the same images can share one), and OUT/recipe.json records what was kept, dropped (and why)
and the counts.
"""
from __future__ import annotations

import hashlib
import html
import json
import multiprocessing
import os
import random
import re
import xml.etree.ElementTree as ET
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Hashable, Iterable, Sequence

from PIL import Image, ImageDraw, ImageFont

from fne_dist.data.shards import WHITE, flatten, stable_id

OPENCLIPART_ROOT = "/usr/share/openclipart"
EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
OPENCLIPART_SIZE = 224
EMOJI_FONT_SIZE = 109  # the only size of the font's color bitmaps
EMOJI_GLYPH = (136, 128)  # the box of one glyph at that size: wider means the font drew several glyphs
# Pillow's bomb guard (MAX_IMAGE_PIXELS) raised for these trusted files: 16 drawings exceed 40 MP; up to twice this
# (1 GB decoded at 250 MP) they are read, the two of 623 MP (stop signs) are dropped as unreadable.
MAX_PIXELS = 250_000_000
# A title that names a collection, a theme or an icon set rather than the drawing.
BOILERPLATE = re.compile(r"^part of the flat icon collection|^clipart by |\btheme\b|iconset|icon-theme", re.I)
MAX_TITLE_SHARE = 16  # a title on more drawings ("gramastar", "card", "AIGA_Symbol_Signs") names a collection
SKIN_TONES = re.compile("[\U0001F3FB-\U0001F3FF]")
TONE_NAME = re.compile(r",? (?:medium-light|medium-dark|medium|light|dark) skin tone")  # as the package names them
VARIATION_SELECTOR = "\uFE0F"
ALT_TEMPLATES = ("a drawing of {x}", "{x} clip art", "{x}, vector illustration", "an illustration of {x}",
                 "{x}", "a picture of {x}", "clipart of {x}", "{x} (drawing)", "a simple graphic of {x}",
                 "cartoon {x}")
EMOJI_TEMPLATES = ("{x}", "{x} emoji", "an emoji of {x}", "the {x} emoji", "{x} icon", "a small picture of {x}",
                   "emoji: {x}", "{x} symbol", "a pictogram of {x}", "{x}, as an emoji")
FLAG = re.compile("[\U0001F1E6-\U0001F1FF\U000E0020-\U000E007F]")  # regional indicators, tag letters


@dataclass(frozen=True)
class Record:
    """One image of a recipe before it is stored: where it comes from, its caption and its group key."""

    name: str  # unique within the recipe: the relative path, or the emoji itself
    source: str  # the PNG file, or the font to render the emoji with
    caption: str
    group_key: str  # equal keys: the same group


def phrased(record: Record, templates: Sequence[str], phrases: Sequence[str]) -> Record:
    """The record captioned by one of `templates` around one of `phrases`, drawn with a seed of its own name, so
    every image keeps its caption whatever the set's order or split seed."""
    rng = random.Random(f"fne-recipe-caption/{record.name}")
    return replace(record, caption=rng.choice(templates).format(x=rng.choice(phrases)))


# ---------------------------------------------------------------- openclipart


def openclipart_title(svg: Path) -> str:
    """The dc:title of the SVG's cc:Work (the drawing's own title; other dc:titles name its author or licence)."""
    work = next((e for e in ET.parse(svg).iter() if e.tag.endswith("}Work")), None)
    title = "" if work is None else next((c.text or "" for c in work if c.tag.endswith("}title")), "")
    return " ".join(html.unescape(title).split())


def boilerplate_title(title: str, share: int) -> bool:
    """True for an empty title, a collection/theme name, or a title that `share` > MAX_TITLE_SHARE drawings carry."""
    return not title or bool(BOILERPLATE.search(title)) or share > MAX_TITLE_SHARE


def openclipart_records(root: str | Path = OPENCLIPART_ROOT) -> tuple[list[Record], Counter]:
    """The human-titled drawings (sorted by relative path) and the count of each reason for dropping one."""
    root = Path(root)
    png_root = root / "png"
    if not png_root.is_dir():
        raise FileNotFoundError(f"{png_root} does not exist: install Debian's openclipart-png and openclipart-svg "
                                "(apt-get install openclipart-png openclipart-svg), or pass --root")
    unique = sorted({p.resolve() for p in png_root.rglob("*.png") if p.resolve().is_file()})
    dropped: Counter = Counter()
    titled = []
    for png in unique:
        rel = png.relative_to(png_root.resolve())
        svg = root / "svg" / rel.with_suffix(".svg")
        try:
            titled.append((str(rel), str(png), openclipart_title(svg)))
        except (OSError, ET.ParseError):
            dropped["no readable SVG with the same relative path"] += 1
    share = Counter(title for _, _, title in titled)
    records = []
    for rel, png, title in titled:
        if boilerplate_title(title, share[title]):
            dropped["empty or boilerplate title"] += 1
        else:
            records.append(Record(rel, png, title, " ".join(title.casefold().split())))
    return records, dropped


def openclipart_alt_records(root: str | Path = OPENCLIPART_ROOT) -> tuple[list[Record], Counter]:
    """openclipart's drawings, each captioned by one of ALT_TEMPLATES around its title."""
    records, dropped = openclipart_records(root)
    return [phrased(r, ALT_TEMPLATES, (r.caption,)) for r in records], dropped


@contextmanager
def _pixel_limit(limit: int):
    old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def stored_image(image: Image.Image, size: int, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """The image fit inside a size x size RGB square of `background`, centred (nothing cropped), transparency
    composited onto it; resized before compositing, so a huge drawing is handled at thumbnail size."""
    rgba = image.convert("RGBA")
    rgba.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = Image.new("RGB", (size, size), background)
    out.paste(flatten(rgba, background), ((size - rgba.width) // 2, (size - rgba.height) // 2))
    return out


def openclipart_image(record: Record, background: tuple[int, int, int] = WHITE) -> Image.Image:
    with _pixel_limit(MAX_PIXELS), Image.open(record.source) as img:
        return stored_image(img, OPENCLIPART_SIZE, background)


# ---------------------------------------------------------------- emoji


def emoji_records(font: str = EMOJI_FONT, chars: Sequence[str] | None = None) -> tuple[list[Record], Counter]:
    """Every fully-qualified emoji (sorted; or those of `chars`) that the font draws as one glyph, named by the
    `emoji` package; grouped by name (a name gives the skin tone: variants are told apart by their captions)."""
    import emoji

    if not Path(font).is_file():
        raise FileNotFoundError(f"{font} does not exist: apt-get install fonts-noto-color-emoji")
    face = ImageFont.truetype(font, EMOJI_FONT_SIZE)
    records, dropped = [], Counter()
    for char in sorted(emoji.EMOJI_DATA if chars is None else chars):
        data = emoji.EMOJI_DATA[char]
        if data["status"] != emoji.STATUS["fully_qualified"]:
            continue
        left, top, right, bottom = face.getbbox(char)
        if (right - left, bottom - top) != EMOJI_GLYPH:
            dropped["not one glyph in the font"] += 1
            continue
        name = " ".join(data["en"].strip(":").replace("_", " ").split())
        name = f"flag {name}" if FLAG.search(char) else name  # the package names flags by country alone
        records.append(Record(char, font, name, name.casefold()))
    return records, dropped


def tone_free(char: str) -> str:
    """The emoji's sequence without skin-tone modifiers and variation selectors: the key of it and its variants."""
    return SKIN_TONES.sub("", char).replace(VARIATION_SELECTOR, "")


def emoji_alias_records(font: str = EMOJI_FONT, chars: Sequence[str] | None = None) -> tuple[list[Record], Counter]:
    """The emoji of `emoji_records`, each captioned by one of EMOJI_TEMPLATES around its tone-free name or an
    alias of it, and grouped with its skin-tone variants."""
    import emoji

    records, dropped = emoji_records(font, chars)
    aliases: dict[str, set[str]] = {}
    for char, data in emoji.EMOJI_DATA.items():
        words = (" ".join(a.strip(":").replace("_", " ").split()) for a in data.get("alias", ()))
        aliases.setdefault(tone_free(char), set()).update(w for w in words if re.fullmatch("[a-zA-Z ]+", w))
    out = []
    for r in records:
        name = TONE_NAME.sub("", r.caption)
        phrases = (name, *sorted(aliases.get(tone_free(r.name), set()) - {name}))
        out.append(phrased(replace(r, group_key=tone_free(r.name)), EMOJI_TEMPLATES, phrases))
    return out, dropped


def emoji_image(record: Record, background: tuple[int, int, int] = WHITE) -> Image.Image:
    face = ImageFont.truetype(record.source, EMOJI_FONT_SIZE)
    glyph = Image.new("RGBA", EMOJI_GLYPH, WHITE + (0,))
    ImageDraw.Draw(glyph).text((0, 0), record.name, font=face, embedded_color=True)
    return stored_image(glyph, max(EMOJI_GLYPH), background)


RECIPES: dict[str, tuple[Callable[..., tuple[list[Record], Counter]], Callable[[Record], Image.Image]]] = {
    "openclipart": (openclipart_records, openclipart_image),
    "emoji": (emoji_records, emoji_image),
    "openclipart-alt": (openclipart_alt_records, openclipart_image),
    "emoji-alias": (emoji_alias_records, emoji_image),
}


# ---------------------------------------------------------------- thumbnails, groups, splits


def _thumbnail(task: tuple[str, Record, str, tuple[int, int, int]]) -> tuple[str, str]:
    """Write one record's stored image once (atomically); returns (path, pixel digest) or ("", why it failed)."""
    recipe, record, path, background = task
    if not os.path.isfile(path):
        try:
            image = RECIPES[recipe][1](record, background)
        except (OSError, Image.DecompressionBombError) as exn:
            return "", f"cannot read the image: {exn}"
        tmp = f"{path}.partial"
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    with Image.open(path) as img:
        return path, hashlib.blake2b(img.convert("RGB").tobytes(), digest_size=16).hexdigest()


def thumbnails(recipe: str, records: Sequence[Record], folder: Path, workers: int,
               background: tuple[int, int, int] = WHITE) -> list[tuple[str, str]]:
    """(path, pixel digest) of each record's stored image, or ("", reason); made in `workers` processes.  Images
    on another background than white are cached under another name."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = "" if background == WHITE else "-%02x%02x%02x" % background
    tasks = [(recipe, r, str(folder / f"{stable_id(r.name)}{suffix}.png"), background) for r in records]
    if workers <= 1:
        return list(map(_thumbnail, tasks))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_thumbnail, tasks, chunksize=16))


def join_groups(keys: Sequence[Iterable[Hashable]]) -> list[int]:
    """Group id of each item from its keys: items sharing any key are joined (union-find), and groups are
    numbered by their first item."""
    parent = list(range(len(keys)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[Hashable, int] = {}
    for i, item_keys in enumerate(keys):
        for key in item_keys:
            j = first.setdefault(key, i)
            parent[find(i)] = find(j)
    number: dict[int, int] = {}
    return [number.setdefault(find(i), len(number)) for i in range(len(keys))]


def group_ids(records: Sequence[Record], digests: Sequence[str]) -> list[int]:
    """Group id of each record: records sharing a group key or identical pixels are joined."""
    return join_groups([(("group", r.group_key), ("pixels", d)) for r, d in zip(records, digests)])


def check_fractions(fractions: dict[str, float], option: str = "{}") -> None:
    """Refuse split shares ({split: share of the items}) that leave a split or train empty, naming each share by
    its command-line option (`option` with the split's name in it), so that a command refuses before slow work."""
    if not all(f > 0 for f in fractions.values()) or sum(fractions.values()) >= 1:
        given = " and ".join(f"{option.format(split)} {f}" for split, f in fractions.items())
        raise ValueError(f"split fractions {given} must be positive and sum to less than 1 (the rest is train)")


def split_by_group(groups: Sequence[int], fractions: float | dict[str, float], seed: int) -> list[str]:
    """The split of each item: groups in a seeded random order fill "test", then the other splits of `fractions`
    ({split: share of the items}; a number is test's share) in turn until each holds its share; the rest is
    "train".  A group never straddles two splits, and the test split does not depend on the others' shares."""
    fractions = {"test": fractions} if isinstance(fractions, (int, float)) else fractions
    check_fractions(fractions)
    sizes = Counter(groups)
    order = sorted(sizes)
    random.Random(f"fne-recipe-split/{seed}").shuffle(order)
    where, groups_left = {}, iter(order)
    for split, fraction in fractions.items():
        room = fraction * len(groups)
        while room > 0 and (g := next(groups_left, None)) is not None:
            where[g] = split
            room -= sizes[g]
    return [where.get(g, "train") for g in groups]


@dataclass(frozen=True)
class Built:
    """A recipe's stored images: per split (path, caption, image id, group), plus what it dropped and counts."""

    splits: dict[str, list[tuple[str, str, int, int]]]
    summary: dict


def build(recipe: str, out_dir: str | Path, *, test_fraction: float = 0.2, val_fraction: float = 0.0, seed: int = 0,
          workers: int = 1, thumbnail_dir: str | Path | None = None, background: tuple[int, int, int] = WHITE,
          **recipe_args) -> Built:
    """Read the recipe's records, store their images (transparency on `background`) under out_dir/thumbnails (or
    thumbnail_dir/<images>, which sets of the same images share), group and split them (val_fraction 0: no val
    split), and write out_dir/recipe.json with the counts."""
    fractions = {"test": test_fraction, **({"val": val_fraction} if val_fraction else {})}
    check_fractions(fractions, "--{}-fraction")  # before the slow part
    records, dropped = RECIPES[recipe][0](**recipe_args)
    kind = RECIPES[recipe][1].__name__.removesuffix("_image")  # openclipart, emoji: whose pictures they are
    folder = Path(out_dir) / "thumbnails" if thumbnail_dir is None else Path(thumbnail_dir) / kind
    made = thumbnails(recipe, records, folder, workers, background)
    for (path, why), record in zip(made, records):
        if not path:
            dropped[why.split(":")[0]] += 1
    kept = [(r, path, digest) for r, (path, digest) in zip(records, made) if path]
    groups = group_ids([r for r, _, _ in kept], [d for _, _, d in kept])
    splits = split_by_group(groups, fractions, seed)
    out: dict[str, list] = {"train": [], **{split: [] for split in ("val", "test") if split in fractions}}
    for (record, path, _), group, split in zip(kept, groups, splits):
        out[split].append((path, record.caption, stable_id(record.name), group))
    if "val" in out and not out["val"]:
        del out["val"]  # too few images for one group's worth: no empty split in the manifest
    sizes = Counter(groups)
    summary = {
        "recipe": recipe, "seed": seed, "test_fraction": test_fraction, "val_fraction": val_fraction,
        "images": len(kept), "distinct_captions": len({r.caption for r, _, _ in kept}), "groups": len(sizes),
        "images_in_groups_over_1": sum(n for n in sizes.values() if n > 1),
        "groups_over_1": sum(1 for n in sizes.values() if n > 1),
        **{split: len(rows) for split, rows in out.items()},
        "dropped": dict(sorted(dropped.items())),
        "unreadable": [r.name for r, (path, _) in zip(records, made) if not path],
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "recipe.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    return Built(out, summary)
