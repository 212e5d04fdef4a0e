"""Where metrics go: one JSON line per record in `metrics.jsonl` and TensorBoard scalars (rank 0 only)."""
from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLog:
    """Append-only: a resumed run adds to the same files, so one run's curves survive preemptions.  A resume first
    `rewind`s them to the checkpoint, so that the steps trained again after a crash are not logged twice."""

    def __init__(self, output_dir: str | Path, enabled: bool):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._jsonl = self._tb = None
        if enabled:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            self._open(purge_step=None)

    def _open(self, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._jsonl = open(self.path, "a", buffering=1)
        self._tb = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=purge_step)

    def size(self) -> int:
        """Bytes written to metrics.jsonl so far (0 where disabled): a checkpoint stores it for `rewind`."""
        return self._jsonl.tell() if self.enabled else 0

    def rewind(self, size: int | None, step: int) -> None:
        """Drop what was logged after a checkpoint: metrics.jsonl past `size` bytes (None: keep all), TensorBoard
        events past `step`."""
        if not self.enabled:
            return
        self.close()
        if size is not None and self.path.stat().st_size > size:
            os.truncate(self.path, size)
        self._open(purge_step=step + 1)

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
