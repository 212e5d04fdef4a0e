"""fne-bench ema runs end to end on 2 gloo ranks under ZeRO-3 and reports the sharded momentum towers per rank as
half the full copy (plus the padding of each parameter to a multiple of the world)."""
import csv

import pytest

from fne_dist.bench.ema import main


def test_ema_bench_reports_half_the_momentum_per_rank_at_world_2(tmp_path):
    out = tmp_path / "ema.csv"
    main(["--world", "2", "--batch", "2", "--steps", "1", "--csv", str(out)])
    mib = {r["layout"]: float(r["momentum_mib_per_rank"]) for r in csv.DictReader(out.open())}
    assert mib["full"] > 0
    assert mib["sharded"] == pytest.approx(mib["full"] / 2, abs=0.01)  # the CSV rounds MiB to 2 decimals
