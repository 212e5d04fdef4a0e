"""Suite-wide settings: offline hubs, one cache for DeepSpeed's JIT ops, Triton's interpreter without a GPU,
free ports for process groups, gloo ranks, the demo's tiny towers."""
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


def gloo_ranks(fn, world: int, out, *args) -> list:
    """fn(rank, world, *args) in `world` spawned processes joined in a gloo group on a free port (fn: a module-level
    function); its results in rank order, passed through files in the folder `out`."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_rank, args=(fn, world, free_port(), str(out), args), nprocs=world)
    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _gloo_rank(rank: int, fn, world: int, port: int, out: str, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.save(fn(rank, world, *args), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
