"""Suite-wide settings: offline hubs, one cache for DeepSpeed's JIT ops, Triton's interpreter without a GPU,
free ports for process groups, the demo's tiny towers."""
import os
from pathlib import Path

import pytest
import torch

from fne_dist.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/models/tiny-vit.json")  # the demo's towers: a 32x32 ViT and a 2-layer text tower, 64-d
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
if not torch.cuda.is_available():
    # Triton reads this when a module with @triton.jit functions is imported: set it before any test module
    # (several import fne_kernels) so that the kernels run in the interpreter on the CPU.
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def tiny_towers():
    from fne_dist.config import ModelSection
    from fne_dist.model import build_towers

    torch.manual_seed(0)
    return build_towers(ModelSection(name=TINY))
