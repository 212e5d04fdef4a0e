"""The WebDataset pipeline: url expansion, determinism, rank splitting, resumption, bad input, eval sets."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image

from fne_dist.data.loader import Batch, expand_urls, id_from_key, load_eval_set, make_train_loader, shards_for_reader
from fne_dist.data.shards import ShardSample, make_manifest, shard_name, write_manifest, write_shard

SIZE = 16


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_set(folder, split: str, sizes: list[int], captions: int = 1, manifest: bool = True) -> list[str]:
    """Shards of `sizes` images each; image i has id i, label i % 3 and `captions` captions."""
    infos, first = [], 0
    for s, n in enumerate(sizes):
        samples = [ShardSample(key=f"{i:06d}", image=png(i), ext="png", image_id=i, label=i % 3,
                               captions=[f"picture {i} caption {c}" for c in range(captions)])
                   for i in range(first, first + n)]
        infos.append(write_shard(folder / shard_name(split, s), samples))
        first += n
    if manifest:
        write_manifest(folder, make_manifest({"test": split}, {split: infos}, skipped=[]))
    return [str(folder / i["name"]) for i in infos]


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def train_tf():
    return image_transform(SIZE, is_train=True)  # random crops: augmentation must be seeded too


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    return write_set(folder, "train", [20, 20, 12, 16, 20, 8]), folder


def loader(urls, tokenizer, preprocess, **kw):
    args = dict(batch_size=4, seed=0, epoch=0, rank=0, world_size=1, shuffle_buffer=16)
    return make_train_loader(urls, preprocess=preprocess, tokenizer=tokenizer, **{**args, **kw})


def same(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(all(torch.equal(x, y) for x, y in zip(p, q)) for p, q in zip(a, b))


def test_expand_urls(shards, tmp_path):
    urls, folder = shards
    assert expand_urls(f"{folder}/train-{{000000..000005}}.tar") == urls
    assert expand_urls(f"{folder}/train-00000[0-5].tar") == urls
    assert expand_urls(f"{urls[0]},{folder}/train-{{000001,000002}}.tar::{urls[3]}") == urls[:4]
    assert expand_urls(urls[1:3]) == urls[1:3]
    with pytest.raises(FileNotFoundError, match=r"train-\{000000..000009\}.tar.*4 of its files do not exist.*fne-make"):
        expand_urls(f"{folder}/train-{{000000..000009}}.tar")
    with pytest.raises(FileNotFoundError, match="do not exist"):
        expand_urls(str(tmp_path / "*.tar"))
    with pytest.raises(ValueError, match="empty shard pattern"):
        expand_urls(" , ")
    assert expand_urls("pipe:curl -s https://x/{0..1}.tar") == ["pipe:curl -s https://x/0.tar",
                                                                 "pipe:curl -s https://x/1.tar"]


def test_batches_deterministic_per_epoch(shards, tokenizer, train_tf):
    urls, _ = shards
    a = list(loader(urls, tokenizer, train_tf))
    b = list(loader(urls, tokenizer, train_tf))
    assert len(a) == 96 // 4 and same(a, b)
    assert a[0].images.shape == (4, 3, SIZE, SIZE) and a[0].images.dtype == torch.float32
    assert a[0].tokens.shape == (4, 77) and a[0].tokens.dtype == torch.long
    assert torch.equal(a[0].labels, a[0].ids % 3)
    assert sorted(torch.cat([x.ids for x in a]).tolist()) == list(range(96))  # one epoch = every pair once
    assert not same(a, list(loader(urls, tokenizer, train_tf, epoch=1)))
    assert not same(a, list(loader(urls, tokenizer, train_tf, seed=1)))


def test_rank_split_disjoint_and_equal_batch_counts(shards, tokenizer, train_tf):
    urls, _ = shards
    for epoch in range(3):
        parts = [shards_for_reader(urls, seed=0, epoch=epoch, rank=r, world_size=2, worker=w, num_workers=2)
                 for r in range(2) for w in range(2)]
        assert sorted(u for p in parts for u in p) == sorted(urls)
    # rank 0 and rank 1 hold different numbers of pairs, yet yield the same count of full batches
    runs = [list(loader(urls, tokenizer, train_tf, rank=r, world_size=2)) for r in range(2)]
    assert len(runs[0]) == len(runs[1]) == 96 // (4 * 2)
    ids = [set(torch.cat([b.ids for b in run]).tolist()) for run in runs]
    held = [set() for _ in range(2)]
    for r in range(2):
        for url in shards_for_reader(urls, seed=0, epoch=0, rank=r, world_size=2):
            with tarfile.open(url) as tar:
                held[r] |= {int(m.name.split(".")[0]) for m in tar.getmembers()}
    assert ids[0] <= held[0] and ids[1] <= held[1] and not held[0] & held[1]


def test_short_rank_cycles_its_shards(tmp_path, tokenizer, train_tf):
    urls = write_set(tmp_path, "train", [4, 40])  # rank with the small shard must repeat it
    runs = [list(loader(urls, tokenizer, train_tf, rank=r, world_size=2)) for r in range(2)]
    assert len(runs[0]) == len(runs[1]) == 44 // 8


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_batches_continues_exactly(shards, tokenizer, train_tf, num_workers):
    urls, _ = shards
    full = list(loader(urls, tokenizer, train_tf, num_workers=num_workers, rank=1, world_size=2))
    for skip in (0, 3, 5, len(full)):
        rest = loader(urls, tokenizer, train_tf, num_workers=num_workers, rank=1, world_size=2, skip_batches=skip)
        assert len(rest) == len(full) - skip
        assert same(full[skip:], list(rest))


def test_workers_yield_equal_batch_counts(shards, tokenizer, train_tf):
    urls, _ = shards
    run = loader(urls, tokenizer, train_tf, num_workers=2, rank=0, world_size=2)
    assert len(list(run)) == len(run) == run.batches_per_epoch == 96 // 8


def test_resampled_is_deterministic_with_fixed_length(shards, tokenizer, train_tf):
    urls, _ = shards
    a = list(loader(urls, tokenizer, train_tf, resampled=True, epoch_pairs=200, rank=1, world_size=2))
    assert len(a) == 200 // 8
    assert same(a, list(loader(urls, tokenizer, train_tf, resampled=True, epoch_pairs=200, rank=1, world_size=2)))
    assert not same(a, list(loader(urls, tokenizer, train_tf, resampled=True, epoch_pairs=200, rank=0, world_size=2)))


def test_captions_expand_and_ids_from_keys(tmp_path, tokenizer, train_tf):
    urls = write_set(tmp_path, "train", [6], captions=3)
    ids = torch.cat([b.ids for b in loader(urls, tokenizer, train_tf, batch_size=6)]).tolist()
    assert sorted(ids) == sorted(list(range(6)) * 3)
    assert id_from_key("000123") == 123 and id_from_key("dir/000123") == 123
    h = id_from_key("coco_val_abc")
    assert h == id_from_key("coco_val_abc") and 0 <= h < 2**63 and h != id_from_key("coco_val_abd")


def write_members(path, members: list[tuple[str, bytes]], truncate: bool = False) -> str:
    """A tar of these members; truncated: cut inside the last member's data, as an interrupted download is."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            cut = tar.offset + 512 + len(data) // 2  # half way into this member's data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue()[:cut] if truncate else buf.getvalue())
    return str(path)


def sample_members(first: int, n: int) -> list[tuple[str, bytes]]:
    return [(f"{i:04d}.{ext}", data) for i in range(first, first + n) for ext, data in
            (("png", png(i)), ("txt", f"caption of {i}".encode()))]


@pytest.fixture
def bad_shards(tmp_path):
    """17 readable pairs and 7 skips: 3 bad members, a non-tar, a truncated tar (3: webdataset reports the cut member
    and the shard's end, and the sample that lost its caption is skipped)."""
    bad = [("0100.png", b"not an image at all"), ("0100.txt", b"corrupt image"),  # undecodable image
           ("0101.png", png(101)), ("0101.txt", b"x"), ("0101.json", b"{not json"),  # bad json
           ("0102.txt", b"no image"),  # no image member
           ("0103.png", png(103)), ("0103.pickle", b"\x80\x04K\x01."), ("0103.txt", b"pickle member ignored"),
           ("0104.png", png(104)), ("0104.txt", b"id and label"), ("0104.json", b'{"image_id": 555, "label": 2}')]
    (tmp_path / "e.tar").write_bytes(b"this is no tar file")
    return [write_members(tmp_path / "a.tar", sample_members(0, 4) + bad),
            write_members(tmp_path / "b.tar", sample_members(4, 4)),
            write_members(tmp_path / "c.tar", sample_members(1000, 8), truncate=True),
            str(tmp_path / "e.tar")]


EXPECTED = sorted([(i, -1) for i in [*range(8), 103, *range(1000, 1007)]] + [(555, 2)])


def test_bad_members_are_skipped_and_counted(bad_shards, tokenizer, train_tf, caplog):
    run = loader(bad_shards, tokenizer, train_tf, batch_size=1, epoch_pairs=17, shuffle_buffer=64)
    with caplog.at_level("WARNING", logger="fne_dist.data.loader"):
        pairs = sorted((i, lab) for b in run for i, lab in zip(b.ids.tolist(), b.labels.tolist()))
    assert pairs == EXPECTED
    assert run.skipped >= 6  # the whole input is buffered before the first pair; 0100's image may come last
    for where in ("a.tar:0100", "a.tar:0101", "a.tar:0102", "c.tar", "c.tar:1007", "e.tar"):
        assert where in caplog.text


def test_a_resumed_loader_counts_only_the_bad_members_after_its_checkpoint(bad_shards, tokenizer, train_tf):
    """A resume passes the batches already trained on by reading them again: the bad members among them were
    counted before the checkpoint (which keeps the count), so the resumed loader does not count them again.  Read in
    order (a one-pair shuffle buffer), the count after batch k plus a loader resumed at k counts every skip once."""
    opts = dict(batch_size=1, epoch_pairs=17, shuffle_buffer=1)
    whole = loader(bad_shards, tokenizer, train_tf, **opts)
    counted = [0] + [whole.skipped for _ in whole]  # after each batch
    assert counted[-1] >= 6
    for k in (2, 6, 12):
        resumed = loader(bad_shards, tokenizer, train_tf, skip_batches=k, **opts)
        assert len(list(resumed)) == 17 - k
        assert counted[k] + resumed.skipped == counted[-1], (k, counted, resumed.skipped)


def test_eval_set_counts_skips_exactly(bad_shards, tokenizer):
    ev = load_eval_set(bad_shards, preprocess=image_transform(SIZE, is_train=False), tokenizer=tokenizer)
    assert sorted(zip(ev.image_ids.tolist(), ev.labels.tolist())) == EXPECTED
    assert ev.skipped == 7


def test_errors_before_training(shards, tmp_path, tokenizer, train_tf):
    urls, _ = shards
    with pytest.raises(ValueError, match="6 shards cannot feed 2 ranks x 4 workers"):
        loader(urls, tokenizer, train_tf, world_size=2, num_workers=4)
    bare = write_set(tmp_path, "train", [4, 4], manifest=False)
    with pytest.raises(ValueError, match="pass epoch_pairs"):
        loader(bare, tokenizer, train_tf)
    with pytest.raises(ValueError, match="less than one global batch"):
        loader(urls, tokenizer, train_tf, epoch_pairs=7, world_size=2)
    with pytest.raises(FileNotFoundError):
        loader(str(tmp_path / "nothing-{0..3}.tar"), tokenizer, train_tf)


def test_eval_set_groups_captions_by_image(tmp_path, tokenizer):
    urls = write_set(tmp_path, "test", [3, 2], captions=2)
    # a second shard naming image 1 again adds its caption to the same entry
    extra = ShardSample(key="dup", image=png(1), ext="png", image_id=1, label=1, captions=["again one"])
    urls.append(str(tmp_path / "extra.tar"))
    write_shard(urls[-1], [extra])
    ev = load_eval_set(urls, preprocess=image_transform(SIZE, is_train=False), tokenizer=tokenizer)
    assert ev.images.shape == (5, 3, SIZE, SIZE) and ev.tokens.shape == (11, 77)
    assert ev.image_ids.tolist() == [0, 1, 2, 3, 4] and ev.labels.tolist() == [0, 1, 2, 0, 1]
    assert ev.text_to_image.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 1]
    assert torch.equal(ev.tokens[10], tokenizer(["again one"])[0]) and ev.skipped == 0
