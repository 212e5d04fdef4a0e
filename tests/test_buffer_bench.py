"""fne-bench buffer runs end to end on gloo ranks and reports the sharded buffer's per-rank memory as N / world."""
import csv

import pytest

from fne_dist.bench.buffer import main


def test_buffer_bench_reports_per_rank_memory_of_n_over_world(tmp_path):
    out = tmp_path / "buffer.csv"
    main(["--layout", "sharded", "--worlds", "1,2", "--queues", "2048", "--world", "2", "--queue", "2048",
          "--dim", "16", "--batch", "8", "--steps", "1", "--csv", str(out)])
    rows = list(csv.DictReader(out.open()))
    mib = {(int(r["world"]), int(r["queue"])): float(r["buffer_mib_per_rank"]) for r in rows}
    assert mib[(1, 2048)] > 0
    assert mib[(2, 2048)] == pytest.approx(mib[(1, 2048)] / 2, abs=0.01)  # the CSV rounds MiB to 2 decimals
