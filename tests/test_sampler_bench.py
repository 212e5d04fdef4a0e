"""Tiny runs of `fne-bench sampler` and `fne-bench infonce` on the CPU: every case measured in its own process,
CSV and plots written."""
import csv

from fne_kernels.bench_sampler import main


def test_cpu_bench_writes_table_csv_and_plots(tmp_path, capsys):
    main(["--device", "cpu", "--b", "8", "--n", "256", "--d", "16", "--repeats", "1", "--out", str(tmp_path)])
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["impl"] for r in rows] == ["dense", "torch", "matmul"]
    assert all(r["status"] == "ok" and float(r["time_ms"]) > 0 and float(r["peak_mib"]) >= 0 for r in rows)
    assert float(rows[-1]["x_matmul"]) == 1.0
    assert (tmp_path / "time.png").stat().st_size > 0 and (tmp_path / "ratio.png").stat().st_size > 0
    assert "x_matmul" in capsys.readouterr().out


def test_cpu_infonce_bench_against_its_three_matmuls(tmp_path):
    """`fne-bench infonce` on the CPU, the fused kernels in the interpreter: every case runs forward and backward."""
    from fne_kernels.bench_infonce import main as infonce

    infonce(["--device", "cpu", "--b", "8", "--n", "300", "--d", "16", "--repeats", "1", "--impl", "triton", "torch",
             "dense", "matmul", "--out", str(tmp_path)])
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["impl"] for r in rows] == ["triton", "torch", "dense", "matmul"]
    assert all(r["status"] == "ok" and float(r["time_ms"]) > 0 and r["regime"] == "fwd+bwd" for r in rows)
    assert float(rows[-1]["x_matmul"]) == 1.0
