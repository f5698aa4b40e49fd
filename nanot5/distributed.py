"""torchrun integration. In a single process every function here is a no-op.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; we initialise the process group from them
(nccl on CUDA, gloo on CPU). `model.py` never imports torch.distributed: wrapping happens here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanot5.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto | cpu | cuda | gpu (nanoT5's name) | cuda:N -> a device this machine has (ConfigError otherwise)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name in ("gpu", "cuda"):
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(f"device={name}: this machine has {count} CUDA device{'s' if count != 1 else ''}"
                              + (" (use device=cpu)" if count == 0 else ""))
    return device


def init(device: str = "auto") -> DistEnv:
    """Read torchrun's environment and join the process group (once)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup() -> None:
    global _checkpoint_group
    _checkpoint_group = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank in the process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes in the process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


_checkpoint_group = None


def checkpoint_group():
    """A second gloo process group for background checkpoint writes (`torch.distributed.checkpoint.async_save`
    runs its collectives in a thread, which must not interleave with the training's collectives on the
    default group; gloo also gives nccl runs the CPU backend async_save needs, as torchtitan does). Created
    on first use: a collective, call it on every rank."""
    global _checkpoint_group
    if _checkpoint_group is None:
        _checkpoint_group = dist.new_group(backend="gloo")
    return _checkpoint_group


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (just `obj` in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True if `flag` holds on at least one rank (just `flag` in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] (just [obj] in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_model(model: torch.nn.Module, strategy: str, env: DistEnv, precision: str = "fp32") -> torch.nn.Module:
    """DDP, or FSDP2 (`fully_shard` per block, then the root) with a bf16 mixed-precision policy."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if precision == "bf16" else MixedPrecisionPolicy()
        for stack in (model.encoder, model.decoder):
            for block in stack.blocks:
                fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    raise ValueError(f"distributed.strategy={strategy!r}: use ddp or fsdp")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP-sharded DTensor (a collective: call on every rank), the tensor itself otherwise."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (no communication), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_state_dicts(model: torch.nn.Module, optimizer, strategy: str,
                     optimizer_too: bool = True) -> tuple[dict, dict | None]:
    """Unsharded model and optimizer state dicts (collective under FSDP: call on every rank)."""
    if strategy != "fsdp" or not (dist.is_available() and dist.is_initialized()):
        return model.state_dict(), optimizer.state_dict() if optimizer_too else None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    model_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not optimizer_too:
        return model_state, None
    optim_state = optimizer.state_dict()  # same parameter order on every rank: gather tensor by tensor
    optim_state["state"] = {k: {n: full_tensor(v).cpu() if isinstance(v, torch.Tensor) else v for n, v in st.items()}
                            for k, st in optim_state["state"].items()}
    return model_state, optim_state


def unsharded_copy(model: torch.nn.Module, strategy: str):
    """The model with whole weights on rank 0 (under FSDP a new unsharded copy, gathered by a collective that
    every rank must call; other ranks get None), the model itself otherwise."""
    if strategy != "fsdp":
        return model
    from nanot5.model import T5

    state, _ = full_state_dicts(model, None, "fsdp", optimizer_too=False)
    if dist.get_rank() != 0:
        return None
    copy = T5(model.config)
    copy.load_state_dict(state)
    return copy


def load_full_state_dicts(model: torch.nn.Module, optimizer, model_state: dict, optim_state: dict,
                          strategy: str) -> None:
    """Load unsharded state dicts; under FSDP every rank keeps only its shards."""
    if strategy != "fsdp" or not (dist.is_available() and dist.is_initialized()):
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, _init_optim_state,
                                                         set_model_state_dict)
    from torch.distributed.tensor import DTensor, distribute_tensor

    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
    # The optimizer decides how its state is laid out (AdamW's moments sharded like the parameter,
    # Adafactor's row statistics sharded, its column statistics replicated). Let it create that
    # state with a zero-lr step on zero gradients, as torch.distributed.checkpoint itself does,
    # then give every saved tensor the layout of its live counterpart.
    _init_optim_state(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for k, st in optim_state["state"].items():
        live = optimizer.state[params[int(k)]]
        for n, v in st.items():
            like = live.get(n)
            if isinstance(like, DTensor) and isinstance(v, torch.Tensor) and v.ndim > 0:
                st[n] = distribute_tensor(v.to(like.device), like.device_mesh, like.placements)
    optimizer.load_state_dict(optim_state)


# ------------------------------------------------------------ sharded checkpoints (torch.distributed.checkpoint)
def sharded_state_dicts(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """What a sharded checkpoint holds, without communication: the tensors {"model": {fqn: tensor},
    "optimizer": {fqn: {name: tensor}}} (under FSDP each rank's DTensor shards; AdamWScale's moments sharded
    like their parameter, Adafactor's column statistics replicated) and the optimizer's host values
    {"state": {fqn: {name: value}}, "param_groups": [...]} (step counts, hyperparameters), which go to
    trainer.pt, so the shards hold tensors only. Keys are parameter names (FQNs), not optimizer indices:
    any process count can read them back."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_state = get_model_state_dict(model)
    optim_state = get_optimizer_state_dict(model, optimizer)
    tensors = {fqn: {n: v for n, v in st.items() if isinstance(v, torch.Tensor)}
               for fqn, st in optim_state["state"].items()}
    host = {"state": {fqn: {n: v for n, v in st.items() if not isinstance(v, torch.Tensor)}
                      for fqn, st in optim_state["state"].items()},
            "param_groups": optim_state["param_groups"]}
    return {"model": model_state, "optimizer": tensors}, host


def load_sharded_state_dicts(model: torch.nn.Module, optimizer, read, optimizer_host: dict) -> None:
    """Restore model and optimizer from a sharded checkpoint into this process's layout (FSDP shards, or
    whole tensors in one process / under DDP). `read(tensors)` fills the tensors of `sharded_state_dicts`'
    layout in place (`checkpoint.read_sharded`: DCP reshards from whatever process count saved them);
    `optimizer_host` is the saved host part. Collective under FSDP: call on every rank."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    # A fresh optimizer has no state yet: get_optimizer_state_dict creates it (a zero-lr step on zero
    # gradients), laid out as the optimizer lays it out on this process layout; the checkpoint then fills it.
    tensors, _ = sharded_state_dicts(model, optimizer)
    read(tensors)
    set_model_state_dict(model, tensors["model"])
    state = {fqn: {**tensors["optimizer"].get(fqn, {}), **values} for fqn, values in optimizer_host["state"].items()}
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": optimizer_host["param_groups"]})
