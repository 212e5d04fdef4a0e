"""Suite-wide settings: offline hubs, one cache for DeepSpeed's JIT ops, Triton's interpreter without a GPU,
free ports for process groups."""
import os
import socket
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
if not torch.cuda.is_available():
    # Triton reads this when a module with @triton.jit functions is imported: set it before any test module
    # (several import fne_kernels) so that the kernels run in the interpreter on the CPU.
    os.environ["TRITON_INTERPRET"] = "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()
