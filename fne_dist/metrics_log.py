"""Where metrics go: one JSON line per record in `metrics.jsonl` and TensorBoard scalars (rank 0 only)."""
from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Append-only: a resumed run adds to the same files, so one run's curves survive preemptions."""

    def __init__(self, output_dir: str | Path, enabled: bool):
        self.enabled = enabled
        self._jsonl = self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            Path(output_dir).mkdir(parents=True, exist_ok=True)
            self._jsonl = open(Path(output_dir) / "metrics.jsonl", "a", buffering=1)
            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def write(self, step: int, kind: str, values: dict) -> None:
        """One record: `kind` is "train" or "eval"; numbers also go to TensorBoard as `kind/name`."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def read(path: str | Path, kind: str | None = None) -> list[dict]:
    """The records of a metrics.jsonl (optionally of one kind)."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r["kind"] == kind]
