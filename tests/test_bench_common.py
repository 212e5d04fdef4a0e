"""What every `fne-bench` subcommand shares: the CSV its runs accumulate in."""
import csv

import pytest

from fne_dist.bench.common import append_csv


def test_append_csv_accumulates_and_refuses_another_header(tmp_path):
    path = tmp_path / "bench.csv"
    append_csv([{"a": 1, "b": 2}], ("a", "b"), path)
    append_csv([{"a": 3, "b": 4}], ("a", "b"), path)
    assert list(csv.DictReader(path.open())) == [{"a": "1", "b": "2"}, {"a": "3", "b": "4"}]
    before = path.read_text()
    with pytest.raises(SystemExit, match=r"bench\.csv holds other columns \(a,b\) than this benchmark writes "
                                         r"\(a,b,c\): pass another --csv, or move that file aside"):
        append_csv([{"a": 5, "b": 6, "c": 7}], ("a", "b", "c"), path)
    assert path.read_text() == before  # nothing written under the old header
