"""fne-bench ema runs end to end on 2 gloo ranks under ZeRO-3 and reports the sharded momentum towers per rank as
half the full copy (plus the padding of each parameter to a multiple of the world)."""
import csv

import pytest
import torch

from fne_dist.bench.ema import main


def test_ema_bench_reports_half_the_momentum_per_rank_at_world_2(tmp_path):
    out = tmp_path / "ema.csv"
    main(["--world", "2", "--batch", "2", "--steps", "1", "--csv", str(out)])
    mib = {r["layout"]: float(r["momentum_mib_per_rank"]) for r in csv.DictReader(out.open())}
    assert mib["full"] > 0
    assert mib["sharded"] == pytest.approx(mib["full"] / 2, abs=0.01)  # the CSV rounds MiB to 2 decimals


def test_nccl_without_a_gpu_is_one_error_line(monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    with pytest.raises(SystemExit) as exit:
        main(["--backend", "nccl", "--world", "1"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "fne-bench ema: error: --backend nccl needs one CUDA GPU per rank (1 ranks, 0 GPUs here): use --backend gloo "
        "(CPU), or fewer ranks")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (--backend nccl)")
def test_ema_bench_runs_on_nccl(tmp_path):
    out = tmp_path / "ema.csv"
    main(["--backend", "nccl", "--world", "1", "--batch", "2", "--steps", "1", "--csv", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert [(r["layout"], r["backend"]) for r in rows] == [("full", "nccl"), ("sharded", "nccl")]
