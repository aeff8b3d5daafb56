"""Healing on N processes with PyTorch's own stack: torchrun starts the processes, FSDP2 (`fully_shard`) shards
the student's weights, gradients and AdamW state and the teacher's weights over them, and each process reads its
share of every global batch.

`rtk heal` is one program whatever the process count. Under torchrun (WORLD_SIZE > 1 in the environment) each
process is one rank: on CUDA it computes on cuda:LOCAL_RANK with NCCL, on the CPU with gloo. One process (no
torchrun, or WORLD_SIZE=1) heals exactly as before, with no process group.

The same settings heal the same model on any number of processes: `micro_batch x grad_accum` blocks make one
global batch (one optimizer step); rank r takes its consecutive 1/N of it in the seeded order, in micro-batches of
at most `micro_batch` blocks. Every micro-batch loss is a mean over equally many tokens and FSDP averages the
gradients over the ranks, so the step's gradient is the mean over the global batch's tokens, as in one process.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch

from rtk.errors import RtkError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_HINT = "launch with torchrun --nproc-per-node N -m rtk heal ..., or rtk heal --nproc N"
# A rank waits this long for the others at a collective (rank 0 alone evaluates and exports at the end; the others
# have left by then). A process that dies is noticed by torchrun, which stops the rest at once.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class World:
    """This process among the N that heal together."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    device: str  # cuda:LOCAL_RANK or cpu

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device.startswith("cuda") else "gloo"


def torchrun_env(env: Mapping[str, str] = os.environ) -> Optional[dict]:
    """torchrun's variables as ints/strings, None when this process was not started by torchrun; one line when
    some are set and others are missing or not numbers."""
    present = [k for k in TORCHRUN_ENV if k in env]
    if not present:
        return None
    missing = [k for k in TORCHRUN_ENV if k not in env]
    if missing:
        raise RtkError(f"torchrun environment incomplete: {', '.join(present)} set, {', '.join(missing)} not; "
                       f"{LAUNCH_HINT}")
    out = {}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        try:
            out[k] = int(env[k])
        except ValueError:
            raise RtkError(f"torchrun environment: {k}={env[k]!r} is not a number; {LAUNCH_HINT}") from None
    out["LOCAL_WORLD_SIZE"] = int(env.get("LOCAL_WORLD_SIZE", out["WORLD_SIZE"]))
    if not 0 <= out["RANK"] < out["WORLD_SIZE"] or not 0 <= out["LOCAL_RANK"] < out["LOCAL_WORLD_SIZE"]:
        raise RtkError(f"torchrun environment: RANK {out['RANK']} / WORLD_SIZE {out['WORLD_SIZE']} / LOCAL_RANK "
                       f"{out['LOCAL_RANK']} do not fit together; {LAUNCH_HINT}")
    return out


def world_device(device: str, local_rank: int, local_size: int) -> str:
    """The device of rank LOCAL_RANK for `--device auto | cpu | cuda`: each process computes on its own GPU."""
    if device == "cpu":
        return "cpu"
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        device = "cuda" if n else "cpu"
        if device == "cpu":
            return "cpu"
    if device != "cuda":
        raise RtkError(f"--device: {device}: under torchrun each process computes on cuda:LOCAL_RANK; give --device "
                       "cuda, auto or cpu")
    if local_size > n:
        raise RtkError(f"--nproc: {local_size} processes on this node but {n} CUDA device{'s' * (n != 1)}; use at "
                       f"most {n} (one per GPU)")
    return f"cuda:{local_rank}"


def current_world(device: str = "auto", env: Mapping[str, str] = os.environ) -> Optional[World]:
    """This process's World under torchrun with more than one process, else None (one process: no sharding)."""
    e = torchrun_env(env)
    if e is None or e["WORLD_SIZE"] == 1:
        return None
    return World(e["RANK"], e["WORLD_SIZE"], e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"],
                 world_device(device, e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"]))


def join(world: World) -> None:
    """Join the process group (torchrun's rendezvous) once."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if world.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(world.device))
    dist.init_process_group(world.backend, timeout=COLLECTIVE_TIMEOUT)


def leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: Optional[World]) -> None:
    if world is not None:
        import torch.distributed as dist

        dist.barrier()


def mean_over_ranks(world: Optional[World], values: list[float]) -> list[float]:
    """The mean of each value over the ranks (the loss of the global batch from each rank's share)."""
    if world is None:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return (t / world.size).tolist()


# ---- the global batch ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Share:
    """Rank r's part of each global batch of `global_blocks`: `accum` micro-batches of `micro` blocks, starting
    `offset` blocks into it."""

    global_blocks: int
    micro: int
    accum: int
    offset: int

    def starts(self, step: int) -> list[int]:
        """The sample index of each of this rank's micro-batches in optimizer step `step` (0-based)."""
        first = step * self.global_blocks + self.offset
        return [first + j * self.micro for j in range(self.accum)]


def share(micro_batch: int, grad_accum: int, world: Optional[World]) -> Share:
    """How this process reads each global batch; one line when the process count does not divide it."""
    g = micro_batch * grad_accum
    if world is None:
        return Share(g, micro_batch, grad_accum, 0)
    if g % world.size:
        raise RtkError(f"heal: the global batch of {g} blocks (micro_batch {micro_batch} x grad_accum {grad_accum}) "
                       f"does not split over {world.size} processes; use a process count that divides {g}, or "
                       "change micro_batch / grad_accum")
    per = g // world.size
    micro = max(d for d in range(1, min(micro_batch, per) + 1) if per % d == 0)
    return Share(g, micro, per // micro, world.rank * per)


# ---- FSDP2 ---------------------------------------------------------------------------------------------------
def shard(model, world: World, cpu_offload: bool = False):
    """FSDP2 over the ranks: each decoder layer one unit, the rest (embeddings, final norm, LM head, tied or not)
    the root's. The root keeps its weights gathered from its forward to the end of its backward (the distillation
    loss reads the LM head's weight between the two); `cpu_offload` keeps the shards, their gradients and AdamW
    state in CPU memory (FSDP2's CPUOffloadPolicy)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh("cuda" if world.device.startswith("cuda") else "cpu", (world.size,))
    policy = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, offload_policy=policy)
    fully_shard(model, mesh=mesh, offload_policy=policy, reshard_after_forward=False)
    return model


def materialize(model, world: World, full: Optional[dict], cpu_offload: bool = False) -> None:
    """After shard(): the weights of rank 0's whole model (`full`, its state dict taken before sharding; None on the
    other ranks, whose models were built on the meta device) sent to every rank, each keeping its shards. Rank 0
    alone reads the checkpoint, so a node holds one copy of the model in CPU memory, not one per process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from rtk.model.modeling_rtk import RtkModel

    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device="cpu" if cpu_offload else world.device)  # offloaded shards live in CPU memory
    set_model_state_dict(model, full if world.main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False))
    inner = model.model
    inner.inv_freq = RtkModel._rope(inner.config)[0].to(world.device)  # not in a state dict


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model) -> dict:
    """Every weight of a sharded model, whole, on rank 0's CPU ({} on the other ranks); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---- rtk heal --nproc N ----------------------------------------------------------------------------------------
def launch(nproc: int, argv: list[str], device: str) -> int:
    """Run `rtk heal` again under torchrun with `nproc` processes on this node (argv: the command's arguments
    without --nproc); returns torchrun's exit status."""
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "rtk",
           "heal", *argv]
    env = dict(os.environ)
    if device == "cpu" or not n_gpu:  # the CPU's cores shared out; torchrun would give each process one thread
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)

