"""torch.distributed helpers that work unchanged with one process (no process group), and the process group's
setup from the environment that every launch path shares (torchrun, the deepspeed launcher, srun, submitit)."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedEnvError(RuntimeError):
    """The environment describes half a process group: a launch the user fixes (the message says how)."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def has_peers() -> bool:
    """Whether a collective would move anything: a process group of two ranks or more.  One process, with or
    without a group (DeepSpeed makes one of one rank), skips them: the result is the input, and a one-rank gloo
    collective still costs 40-90 us of CPU (three a training step)."""
    return is_distributed() and dist.get_world_size() > 1


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce `t` in place over all ranks (a no-op in one process); returns `t`."""
    if has_peers():
        dist.all_reduce(t, op=op)
    return t


@torch.no_grad()
def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors of every rank along dim 0, in rank order (no gradient): one collective
    straight into the result (t itself in one process)."""
    if not has_peers():
        return t
    out = t.new_empty((dist.get_world_size() * len(t), *t.shape[1:]))
    dist.all_gather_single(out, t.contiguous())
    return out


@torch.no_grad()
def all_to_all(t: torch.Tensor) -> torch.Tensor:
    """Exchange equal chunks along dim 0: chunk s of every rank goes to rank s, and the result holds, in rank
    order, the chunks every rank sent here (t itself in one process)."""
    if not has_peers():
        return t
    out = torch.empty_like(t)
    dist.all_to_all_single(out, t.contiguous())
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank (one all-reduce: call it on every rank)."""
    return bool(ranks_where(flag))


def ranks_where(flag: bool) -> list[int]:
    """On every rank, the ranks where `flag` is True (one all-reduce: call it on every rank)."""
    device = "cuda" if is_distributed() and dist.get_backend() == "nccl" else "cpu"
    flags = torch.zeros(world_size(), device=device)
    flags[rank()] = float(flag)
    return all_reduce(flags).nonzero().flatten().tolist()


def rank_from_env() -> int:
    """This process's global rank before the process group exists (torchrun, srun, submitit), else 0."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def free_port() -> int:
    """A TCP port free on this machine now (for a process group of one machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_distributed_env() -> bool:
    """Set torch's env:// variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) where no launcher did.

    torchrun and the deepspeed launcher set them; inside a submitit job or a plain `srun` step, submitit's
    `TorchDistributedEnvironment` derives them from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and the first host of
    SLURM_JOB_NODELIST (the port is drawn from the job id, so every task picks the same one).  A plain srun step is
    told apart from the batch script by SLURM_STEP_ID: the batch script runs one process whatever SLURM_NTASKS says.
    CUDA_VISIBLE_DEVICES is left alone: every task sees the node's GPUs and uses the one at LOCAL_RANK.
    Returns True when it exported, False when there was nothing to do (a launcher did it, or a single process).
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return False
    if "SLURM_STEP_ID" in os.environ:
        os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")  # how submitit recognises a SLURM task
    try:
        import submitit  # here: the sampler stack imports this module and must not need submitit (GPU image)

        env = submitit.helpers.TorchDistributedEnvironment()
    except RuntimeError:  # neither a submitit job nor an srun step
        return False
    env.export(set_cuda_visible_devices=False)
    return True


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this process created the process group and destroys it at the end


def env_world_size() -> int:
    """The world size the environment describes (1 for a lone process), before any process group exists, so that a
    run can check its config against it first.  Exports SLURM's variables as torch's where a job needs it."""
    export_distributed_env()  # inside a submitit job or an srun step: from SLURM's variables
    present = [v for v in ENV_VARS if v in os.environ]
    if present and len(present) < len(ENV_VARS):
        missing = [v for v in ENV_VARS if v not in os.environ]
        raise DistributedEnvError(f"{', '.join(present)} set but {', '.join(missing)} not: start the ranks with "
                                  "torchrun, the deepspeed launcher or fne-launch, or set all of "
                                  + ", ".join(ENV_VARS))
    return int(os.environ.get("WORLD_SIZE", "1"))


def _without_shm_op() -> None:
    """Tell DeepSpeed that its CPU shared-memory all-reduce op cannot be built.  Otherwise its comm backend
    JIT-compiles the op at the first start on a CPU (2-4 minutes, silently, into ~/.cache/torch_extensions), yet
    only DeepSpeed's inference all-reduce uses it, never training, whose collectives are gloo's.  DeepSpeed keeps
    the probed table in one dict so that such an edit holds."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed() -> Runtime:
    """Join (or, alone, create) the process group described by the environment."""
    import deepspeed  # here: importing DeepSpeed probes for accelerators, which launchers need not

    env_world_size()  # all of ENV_VARS are set, or none
    if "RANK" not in os.environ:  # a lone process: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        _without_shm_op()
    owns = not is_distributed()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return Runtime(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)
