"""Shards from servers on the loopback address: HTTP(S) (urllib and `pipe:curl`) and S3 (moto's emulator).

Remote batches equal the local ones; a connection cut mid-shard is resumed exactly, and so is a server that trickles
bytes, once a read lasts past its deadline; a shard that answers 404, one cut every time and a stalled server are
skipped, named in the log and counted, in bounded time; ranks and workers split remote shards without overlap;
resampled remote shards resume exactly; fne-train trains from both servers.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from loopback import TRICKLE_FAST, ShardServer, s3_server, self_signed
from slurm_fixtures import ROOT, demo_overrides, read_metrics
from test_data import loader, same, tokenizer, train_tf, write_set  # noqa: F401 (fixtures)

from fne_dist.config import ConfigError, load_config
from fne_dist.data.loader import expand_urls
from fne_dist.data.digits import build_demo_shards
from fne_dist.data.remote import _s3_client

N_SHARDS, PAIRS = 8, 12  # equal shards: 2 ranks x 2 workers read 2 shards each, none twice
FAST = dict(timeout=1.0, retries=1)
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (pipe:curl patterns)")


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    folder = tmp_path_factory.mktemp("remote-shards")
    return write_set(folder, "train", [PAIRS] * N_SHARDS, manifest=False), folder


@pytest.fixture(scope="module")
def s3(local):
    urls, _ = local
    with s3_server("shards", [Path(u) for u in urls]) as env:
        yield env


def remote(local, scheme: str, base: str = "") -> list[str]:
    """The local shards' urls as the scheme writes them (same order)."""
    names = [Path(u).name for u in local[0]]
    if scheme == "http":
        return [f"{base}/{n}" for n in names]
    if scheme == "curl":
        return [f"pipe:curl -fsSL {base}/{n}" for n in names]
    return [f"s3://shards/{n}" for n in names]


def read(urls, tokenizer, train_tf, **kw):
    return loader(urls, tokenizer, train_tf, epoch_pairs=N_SHARDS * PAIRS, **kw)


@pytest.mark.parametrize("scheme", ["http", pytest.param("curl", marks=needs_curl), "s3"])
def test_remote_batches_equal_local(local, s3, scheme, tokenizer, train_tf):
    with ShardServer(local[1]) as server:
        got = read(remote(local, scheme, server.url), tokenizer, train_tf)
        batches = list(got)
    assert same(batches, list(read(local[0], tokenizer, train_tf))) and got.skipped == 0


@needs_curl
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed (makes the test certificate)")
def test_https_through_the_trust_store(local, tmp_path, monkeypatch, tokenizer, train_tf):
    cert, key = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # urllib trusts what the system store (here: this file) holds
    with ShardServer(local[1], tls=(cert, key)) as server:
        urls = remote(local, "http", server.url)
        urls[1] = f"pipe:curl -fsSL --cacert {cert} {urls[1]}"
        got = read(urls, tokenizer, train_tf)
        batches = list(got)
    assert server.url.startswith("https://") and got.skipped == 0
    assert same(batches, list(read(local[0], tokenizer, train_tf)))


@pytest.mark.parametrize("scheme", ["http", "http-no-ranges", pytest.param("curl", marks=needs_curl)])
def test_connection_cut_mid_shard_resumes_exactly(local, scheme, tokenizer, train_tf, caplog):
    name = Path(local[0][2]).name
    with ShardServer(local[1], faults={name: ("cut", 1)}, ranges=scheme != "http-no-ranges") as server:
        got = read(remote(local, scheme.split("-")[0], server.url), tokenizer, train_tf, **FAST)
        with caplog.at_level("WARNING", logger="fne_dist.data.remote"):
            batches = list(got)
        tries = [r for n, r in server.requests if n == name]
    assert same(batches, list(read(local[0], tokenizer, train_tf))) and got.skipped == 0
    assert f"{name}: " in caplog.text and "retry 1 of 1" in caplog.text
    # urllib asks for the rest (a server without ranges sends it all, the bytes already read are dropped);
    # curl's pipe is run again and the bytes already read are dropped
    assert len(tries) == 2 and (tries[1] is not None) == scheme.startswith("http")


@pytest.mark.parametrize("scheme", ["http", pytest.param("curl", marks=needs_curl)])
def test_missing_and_always_cut_shards_are_skipped_named_counted(local, scheme, tokenizer, train_tf, caplog):
    cut, missing = Path(local[0][1]).name, Path(local[0][4]).name
    with ShardServer(local[1], faults={cut: ("cut", 99), missing: "missing"}) as server:
        got = read(remote(local, scheme, server.url), tokenizer, train_tf, **FAST)
        with caplog.at_level("WARNING"):
            ids = torch.cat([b.ids for b in got]).tolist()
    assert len(ids) == N_SHARDS * PAIRS  # the epoch keeps its length: the reader goes round its other shards
    assert not set(ids) & set(range(4 * PAIRS, 5 * PAIRS))  # nothing of the missing shard
    assert got.skipped >= 2
    given_up = [r.getMessage() for r in caplog.records if "the rest of the shard is skipped" in r.getMessage()]
    assert any(cut in m and "after 2 attempts" in m for m in given_up)  # tried, retried once, given up
    assert any(missing in m for m in given_up)
    if scheme == "http":
        assert "HTTP 404" in caplog.text and [n for n, _ in server.requests].count(missing) == 1  # not retried


@pytest.mark.parametrize("scheme", ["http", pytest.param("curl", marks=needs_curl), "s3"])
def test_stalled_server_times_out_and_is_skipped(local, s3, scheme, tokenizer, train_tf, caplog):
    stalled = Path(local[0][3]).name
    with ShardServer(local[1], faults={stalled: "stall"}) as server:
        urls = remote(local, scheme, server.url)
        if scheme == "s3":  # one shard from the stalled HTTP server among the S3 ones
            urls[3] = f"{server.url}/{stalled}"
        got = read(urls, tokenizer, train_tf, **FAST)
        start = time.monotonic()
        with caplog.at_level("WARNING"):
            ids = torch.cat([b.ids for b in got]).tolist()
        seconds = time.monotonic() - start
    # 2 attempts x 1 s timeout + 1 s pause, and the reading itself; a hang would last until the server stops
    assert seconds < 20, f"took {seconds:.0f} s"
    assert len(ids) == N_SHARDS * PAIRS and not set(ids) & set(range(3 * PAIRS, 4 * PAIRS))
    assert got.skipped >= 1 and stalled in caplog.text and "after 2 attempts" in caplog.text


@pytest.mark.parametrize("scheme", ["http", pytest.param("curl", marks=needs_curl), "s3"])
def test_trickling_server_is_given_up_and_resumed_from_the_byte(local, s3, scheme, tokenizer, train_tf, caplog,
                                                                 monkeypatch, request):
    """One byte every 0.4 s keeps every wait under the 1 s timeout: the first 64 KiB read is given up after
    timeout + 64 KiB / min_rate = 2 s, and the shard reopened after the bytes it got (the retry is served whole)."""
    name = Path(local[0][3]).name
    upstream = s3["AWS_ENDPOINT_URL"] if scheme == "s3" else None
    fault = f"shards/{name}" if scheme == "s3" else name  # S3 asks for /bucket/key
    with ShardServer(local[1], faults={fault: ("trickle", 1)}, upstream=upstream) as server:
        if scheme == "s3":  # boto3 reaches moto through the trickling server: a client made for it
            monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
            _s3_client.cache_clear()
            request.addfinalizer(_s3_client.cache_clear)
        urls = [u.replace("curl ", "curl -N ") for u in remote(local, scheme, server.url)]  # curl: byte by byte
        got = read(urls, tokenizer, train_tf, min_rate=65536, **FAST)
        start = time.monotonic()
        with caplog.at_level("WARNING", logger="fne_dist.data.remote"):
            batches = list(got)
        seconds = time.monotonic() - start
        tries = [r for n, r in server.requests if n == fault]
    # 2 s for the trickled read, 1 s pause, the rest at full speed; before the deadline: 30 s, until the server cut
    assert seconds < 10, f"took {seconds:.0f} s"
    assert "too slow" in caplog.text and "retry 1 of 1" in caplog.text and got.skipped == 0
    assert same(batches, list(read(local[0], tokenizer, train_tf)))
    assert len(tries) == 2 and (tries[1] is None) == (scheme == "curl")  # curl is re-run, the bytes read dropped
    if scheme != "curl":  # a range request after the bytes that came: the first 1,000 and a few trickled ones
        assert TRICKLE_FAST < int(re.fullmatch(r"bytes=(\d+)-", tries[1]).group(1)) <= TRICKLE_FAST + 25


def test_ranks_and_workers_split_remote_shards(local, tokenizer, train_tf):
    with ShardServer(local[1]) as server:
        runs = [list(read(remote(local, "http", server.url), tokenizer, train_tf, rank=r, world_size=2,
                          num_workers=2)) for r in range(2)]
        requested = sorted(n for n, _ in server.requests)
    ids = [torch.cat([b.ids for b in run]).tolist() for run in runs]
    assert len(ids[0]) == len(ids[1]) == N_SHARDS * PAIRS // 2
    assert sorted(ids[0] + ids[1]) == list(range(N_SHARDS * PAIRS))  # every pair once, no overlap
    assert requested == sorted(Path(u).name for u in local[0])  # each shard read by one reader, once


def test_resampled_remote_shards_resume_exactly(local, s3, tokenizer, train_tf):
    urls = remote(local, "s3")
    kw = dict(resampled=True, epoch_pairs=160, rank=1, world_size=2, num_workers=2)
    full = list(loader(urls, tokenizer, train_tf, **kw))
    assert len(full) == 160 // 8
    for skip in (3, 7):
        rest = loader(urls, tokenizer, train_tf, skip_batches=skip, **kw)
        assert len(rest) == len(full) - skip and same(full[skip:], list(rest))


def test_remote_settings_are_checked(local):
    with pytest.raises(ValueError, match="remote shards never are.*pass epoch_pairs.*data.epoch_pairs"):
        loader(["http://127.0.0.1:9/a.tar"], None, None)
    with pytest.raises(ValueError, match="'gs:' has no opener.*pipe:gsutil cat"):
        expand_urls("gs://bucket/train-{0..3}.tar")
    assert expand_urls("s3://b/x-{0..1}.tar") == ["s3://b/x-0.tar", "s3://b/x-1.tar"]
    with pytest.raises(ConfigError, match="data.timeout=0.0 must be > 0"):
        load_config(overrides=["data.train=x", "data.timeout=0"])
    with pytest.raises(ConfigError, match="data.retries=-1 must be >= 0"):
        load_config(overrides=["data.train=x", "data.retries=-1"])
    with pytest.raises(ConfigError, match="data.min_rate=0.0 must be > 0 bytes/s"):
        load_config(overrides=["data.train=x", "data.min_rate=0"])


def test_train_from_http_and_s3(tmp_path, port):
    """fne-train on one rank for one epoch from both servers at once, one shard missing: every shard is read, the
    missing one is skipped, named and counted, and the run goes on."""
    shards = tmp_path / "shards"
    build_demo_shards(shards, shard_size=4)  # 12 pairs a shard
    names = [f"train-{i:06d}.tar" for i in range(8)]
    with ShardServer(shards) as server, s3_server("demo", [shards / n for n in names[4:]]) as env:
        pattern = (f"pipe:curl -fsSL {server.url}/train-{{000000..000001}}.tar::{server.url}/train-000002.tar::"
                   f"{server.url}/gone.tar::s3://demo/train-{{000004..000007}}.tar")
        overrides = demo_overrides(shards, tmp_path / "run", steps=10) + [
            f"data.train={pattern}", "data.epoch_pairs=84", "data.shuffle_buffer=16", "data.timeout=5",
            "data.retries=1", "train.epochs=1"]
        environ = {**os.environ, **env, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        # the first DeepSpeed start in a fresh clone builds its CPU comm op (minutes on a loaded 2-core machine)
        done = subprocess.run([sys.executable, "-m", "fne_dist.train", "--config", str(ROOT / "configs/demo.yaml"),
                               *overrides], env=environ, capture_output=True, text=True, timeout=400)
        requested = {n for n, _ in server.requests}
    assert done.returncode == 0, done.stderr[-4000:]
    train = read_metrics(tmp_path / "run")
    assert [r["step"] for r in train] == list(range(1, 11)) and all(r["loss"] == r["loss"] for r in train)
    assert train[-1]["data_skipped"] == 1 and "gone.tar: HTTP 404" in done.stderr
    assert requested == {"train-000000.tar", "train-000001.tar", "train-000002.tar", "gone.tar"}
