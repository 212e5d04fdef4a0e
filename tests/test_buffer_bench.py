"""fne-bench buffer runs end to end on gloo ranks and reports the sharded buffer's per-rank memory as N / world, with
the sampling objective and with the posterior InfoNCE."""
import csv

import pytest
import torch

from fne_dist.bench.buffer import main


@pytest.mark.parametrize("objective", ["fne", "posterior_infonce"])
def test_buffer_bench_reports_per_rank_memory_of_n_over_world(tmp_path, objective):
    out = tmp_path / "buffer.csv"
    main(["--objective", objective, "--layout", "sharded", "--worlds", "1,2", "--queues", "2048", "--world", "2",
          "--queue", "2048", "--dim", "16", "--batch", "8", "--steps", "1", "--csv", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert {r["objective"] for r in rows} == {objective} and all(float(r["step_ms"]) > 0 for r in rows)
    mib = {(int(r["world"]), int(r["queue"])): float(r["buffer_mib_per_rank"]) for r in rows}
    assert mib[(1, 2048)] > 0
    assert mib[(2, 2048)] == pytest.approx(mib[(1, 2048)] / 2, abs=0.01)  # the CSV rounds MiB to 2 decimals


def test_nccl_without_a_gpu_per_rank_is_one_error_line(monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    with pytest.raises(SystemExit) as exit:
        main(["--backend", "nccl", "--worlds", "1", "--world", "2"])  # the second sweep's 2 ranks need 2 GPUs
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("fne-bench buffer: error: --backend nccl needs one CUDA GPU per rank (2 ranks, 1 GPUs here): use "
                   "--backend gloo (CPU), or fewer ranks")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (--backend nccl)")
def test_buffer_bench_runs_on_nccl(tmp_path):
    out = tmp_path / "buffer.csv"
    main(["--backend", "nccl", "--worlds", "1", "--queues", "2048", "--world", "1", "--queue", "2048", "--steps", "1",
          "--csv", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert [r["backend"] for r in rows] == ["nccl", "nccl"] and all(float(r["step_ms"]) > 0 for r in rows)
