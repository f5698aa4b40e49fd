"""Optimizers, parameter groups and learning-rate schedules for T5 pre-training and fine-tuning.

- `AdamWScale`: AdamW whose step for each weight matrix is multiplied by that matrix's RMS, the
  change that lets AdamW train T5 at lr 2e-2 (nanoT5, arXiv 2309.02373, section 3; the RMS factor
  is Adafactor's relative step size, Shazeer & Stern 2018, arXiv 1804.04235, section 8).
- `Adafactor`: factored second moments and update clipping (Shazeer & Stern 2018), with the
  semantics of HF `transformers.Adafactor(lr=..., relative_step=False, scale_parameter=True,
  warmup_init=False)`, as nanoT5 runs it.
- AdamW: `torch.optim.AdamW`, fused where the device has the kernel (`build_optimizer("adamw")`).
- `lr_schedule`: learning rates as pure functions of the step (nothing to checkpoint).
- `param_groups`: weight decay on matrices only; every trainable parameter in exactly one group.

No `step` here synchronises with the host: per-matrix factors stay on the device as 0-d
tensors. (nanoT5's `max(1e-3, rms(p))` reads each RMS back: one device sync per parameter.)

Logical matrices. Our T5 stores q/k/v, k/v and wi_0/wi_1 as one fused matrix each (row blocks
concatenated along dim 0, see `T5.fused_row_blocks`). nanoT5 and Adafactor treat every HF matrix
on its own (its own RMS, its own factored statistics), so a param group may carry
`row_blocks`: one int per parameter, the number of equal row blocks it holds. `param_groups`
fills it in; each block is then optimised exactly as a separate matrix would be.

Sharded parameters. Under FSDP2 (`fully_shard`) parameters are DTensors whose dim 0 (rows) is
split over the processes, and a shard boundary may cut a row block. Both optimizers update the
local rows and take every whole-matrix quantity (sums of squares for the RMS, Adafactor's column
statistics) as local partial sums completed by one all_reduce per step for all parameters
(`_Partials`); with whole tensors that reduction is a no-op. One code path, the same formulas.
"""

from __future__ import annotations

import logging
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from nanot5.config import OPTIMIZERS, SCHEDULERS

logger = logging.getLogger(__name__)

_HALF = (torch.float16, torch.bfloat16)
_FUSED_DEVICES = ("cpu", "cuda")  # where torch has the fused AdamW kernel with a tensor lr
_FUSED_MIN_NUMEL = 1 << 16


# --------------------------------------------------------------------------- helpers
def _check_row_blocks(group: dict[str, Any], owner: str) -> None:
    """Validate a group's `row_blocks` (None, or one positive int per parameter)."""
    blocks = group.get("row_blocks")
    if blocks is None:
        return
    params = group["params"]
    if len(blocks) != len(params):
        raise ValueError(f"{owner}: param group has {len(params)} params but {len(blocks)} row_blocks")
    for i, (p, n) in enumerate(zip(params, blocks)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{owner}: row_blocks[{i}] must be a positive int, got {n!r}")
        if n > 1 and (p.ndim != 2 or p.shape[0] % n):
            raise ValueError(f"{owner}: row_blocks[{i}]={n} does not split a parameter of shape "
                             f"{tuple(p.shape)} into equal row blocks (a matrix is needed)")


def _blocks_of(group: dict[str, Any]) -> list[int]:
    blocks = group.get("row_blocks")
    return [1] * len(group["params"]) if blocks is None else list(blocks)


def _check_lr(lr: Any, owner: str) -> float:
    # A tensor lr would force `float()` (a sync) or a recompute per step; schedules give floats.
    if isinstance(lr, Tensor) or not isinstance(lr, (int, float)):
        raise TypeError(f"{owner}: lr must be a Python float, got {type(lr).__name__}")
    if lr < 0:
        raise ValueError(f"{owner}: invalid learning rate {lr}; must be >= 0")
    return float(lr)


def _grad(p: Tensor, owner: str) -> Tensor:
    if p.grad.is_sparse:
        raise RuntimeError(f"{owner} does not support sparse gradients")
    if p.is_complex():
        raise RuntimeError(f"{owner} does not support complex parameters")
    return p.grad


# ------------------------------------------------------------------- sharded parameters
def _dtensor_class():
    """`DTensor`, or None while torch.distributed.tensor is not imported (then none can exist;
    importing it here would cost every single-process run 0.4 s)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return None if mod is None else mod.DTensor


def _local(x: Tensor) -> Tensor:
    """This process's part of a DTensor; a plain tensor itself."""
    cls = _dtensor_class()
    return x.to_local() if cls is not None and isinstance(x, cls) else x


class _Shard:
    """Where a parameter's local tensor lies in the whole: rows [offset, offset + rows) of dim 0;
    the other processes of `group` hold the other rows (group None: the local tensor is whole).

    FSDP2 (`fully_shard`) shards dim 0 as `torch.chunk` does (torch/distributed/fsdp/
    _fully_shard/_fsdp_param.py): rank i of k holds rows [i c, min((i + 1) c, rows)), c = ceil(rows / k),
    so the last ranks may hold fewer rows, or none.
    """

    __slots__ = ("local", "offset", "rows", "group")

    def __init__(self, p: Tensor, owner: str):
        self.local = local = _local(p)
        self.offset, self.rows, self.group = 0, (local.shape[0] if local.ndim else 1), None
        if local is p:
            return
        from torch.distributed.tensor import Replicate, Shard

        mesh, placements = p.device_mesh, p.placements
        sharded = [d for d, pl in enumerate(placements) if not isinstance(pl, Replicate)]
        if not sharded:
            return  # replicated: every process holds the whole parameter
        if len(sharded) > 1 or placements[sharded[0]] != Shard(0):
            raise NotImplementedError(f"{owner}: a parameter of shape {tuple(p.shape)} is sharded as "
                                      f"{placements}; only dim-0 shards (FSDP2's Shard(0)) are supported")
        dim = sharded[0]
        k, i, total = mesh.size(dim), mesh.get_local_rank(dim), p.shape[0]
        chunk = -(-total // k)
        self.offset = min(i * chunk, total)
        self.group = mesh.get_group(dim)
        if self.rows != max(0, min(chunk, total - self.offset)):
            raise NotImplementedError(f"{owner}: rank {i} of {k} holds {self.rows} of {total} rows, not "
                                      f"torch.chunk's share; this sharding is not supported")

    def segments(self, total_rows: int, n: int) -> list[tuple[int, int, int]]:
        """(block, start, stop): the local rows of each of the n equal row blocks of a
        `total_rows`-row parameter that this shard holds (a shard boundary may cut a block)."""
        size = total_rows // n
        out = []
        for b in range(n):
            lo, hi = max(b * size, self.offset), min((b + 1) * size, self.offset + self.rows)
            if lo < hi:
                out.append((b, lo - self.offset, hi - self.offset))
        return out

    def runs(self, total_rows: int, n: int) -> list[tuple[int, int, int, int]]:
        """(first block, blocks, start, stop): `segments` with consecutive whole blocks merged, so
        that a whole parameter is one run of n blocks, viewed (n, rows / n, ...)."""
        size = total_rows // n
        out: list[list] = []
        for b, lo, hi in self.segments(total_rows, n):
            if out and hi - lo == size and out[-1][3] - out[-1][2] == out[-1][1] * size and out[-1][3] == lo:
                out[-1][1], out[-1][3] = out[-1][1] + 1, hi
            else:
                out.append([b, 1, lo, hi])
        return [tuple(r) for r in out]


def _new_state(p: Tensor, local_shape: tuple[int, ...], global_shape: tuple[int, ...], dtype: torch.dtype,
               sharded: bool) -> Tensor:
    """Zeros for optimizer state: plain for a plain p; for a DTensor p a DTensor on its mesh,
    sharded on dim 0 like p (`sharded`) or replicated, so checkpoints (DCP) can reshard it."""
    local = torch.zeros(local_shape, dtype=dtype, device=_local(p).device)
    if _local(p) is p:
        return local
    from torch.distributed.tensor import DTensor, Replicate

    if not sharded:
        return DTensor.from_local(local, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False)
    stride = torch.empty(global_shape, device="meta").stride()
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                              shape=torch.Size(global_shape), stride=stride)


class _Partials:
    """Partial sums over this process's shards, completed across the shard groups in one go.

    Optimizers `add` each tensor of local sums (of squares, of rows) with the process group its
    parameter is sharded over; `reduce` then sums all of them with one all_reduce per (group,
    dtype, device), in place. Sums of whole (unsharded) parameters come with group None and are
    complete already, so in one process `reduce` does nothing.
    """

    def __init__(self):
        self._pending: dict[tuple, list[Tensor]] = {}

    def add(self, t: Tensor, group) -> Tensor:
        if group is not None:
            self._pending.setdefault((group, t.dtype, t.device), []).append(t)
        return t

    def reduce(self) -> None:
        import torch.distributed as dist

        for (group, _, _), ts in self._pending.items():
            flat = torch.cat([t.reshape(-1) for t in ts])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            torch._foreach_copy_(ts, [x.view_as(t) for x, t in zip(flat.split([t.numel() for t in ts]), ts)])
        self._pending.clear()


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    # sums of squares in fp32 at least: a bf16 rms would put a 0.4% error on every step
    return torch.float32 if dtype in _HALF else dtype


# ------------------------------------------------------------------------ AdamWScale
class AdamWScale(torch.optim.Optimizer):
    """AdamW with each matrix's step scaled by its RMS (nanoT5's optimizer).

    Per logical matrix p with gradient g, at step t (1-based), with decoupled weight decay:
        m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
        p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * max(1e-3, rms(p)) * m / (sqrt(v) + eps)
        p -= lr * weight_decay * p
    where rms(p) = ||p||_2 / sqrt(numel(p)) is taken before the update (nanoT5's `AdamWScale`,
    which is HF's old AdamW plus the rms factor). `scale_parameter=False` drops the factor
    (plain HF-style AdamW). `fused=None` uses torch's fused AdamW kernel (CPU, CUDA) for
    tensors of >= 64Ki elements and foreach ops for the rest; `fused=True` or `False` forces
    one. Both are exact and never sync with the host.

    FSDP2 shards (DTensors on dim 0): each process updates its rows; ||p||^2 of every logical
    matrix is summed from the shards' partial sums with one all_reduce per step for all
    parameters (`_Partials`). The moments are DTensors sharded like p.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, *, scale_parameter: bool = True,
                 fused: bool | None = None):
        _check_lr(lr, "AdamWScale")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamWScale: betas must be in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"AdamWScale: eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        self.fused = fused
        self._ones: dict[torch.device, Tensor] = {}
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        scale_parameter=scale_parameter, row_blocks=None)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_row_blocks(self.param_groups[-1], "AdamWScale")

    def _use_fused(self, p: Tensor) -> bool:
        if self.fused is False:
            return False
        supported = (p.device.type in _FUSED_DEVICES and p.dtype in (torch.float32, torch.float64, *_HALF)
                     and hasattr(torch, "_fused_adamw_"))
        if self.fused:
            if not supported:
                raise RuntimeError(f"AdamWScale(fused=True): no fused kernel for {p.dtype} on {p.device}")
            return True
        # One fused call per matrix pays off for big ones. Small ones (norm weights) go to foreach,
        # which on CUDA updates them all with a few launches, and on CPU runs them inline instead
        # of opening a parallel region per call (milliseconds each on a busy machine).
        return supported and p.numel() >= _FUSED_MIN_NUMEL

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # two passes: local sums of squares of every group, one reduction, then the updates
        partials = _Partials()
        work = [self._prepare(group, partials) for group in self.param_groups]
        partials.reduce()
        for group, buckets in zip(self.param_groups, work):
            self._update(group, buckets)
        return loss

    def _prepare(self, group: dict[str, Any], partials: _Partials) -> dict[tuple, dict[str, list]]:
        """Local tensors per (device, dtype, fused, shard group) bucket, one entry per piece of a
        logical matrix held here, and the pieces' sums of squares (added to `partials`)."""
        lr = _check_lr(group["lr"], "AdamWScale")
        beta1, beta2 = group["betas"]
        buckets: dict[tuple, dict[str, list]] = {}
        for p, n in zip(group["params"], _blocks_of(group)):
            if p.grad is None:
                continue
            grad = _grad(p, "AdamWScale")
            state = self.state[p]
            if not state:
                state["step"] = 0  # a host int: bias corrections need no device read
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            t = state["step"]
            coef = lr * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)  # bias-corrected lr
            shard = _Shard(p, "AdamWScale")
            local = shard.local
            b = buckets.setdefault((local.device, local.dtype, self._use_fused(local), shard.group),
                                   dict(params=[], p=[], g=[], m=[], v=[], seg=[], blocks=[]))
            b["params"].append(local)
            xs = [local, _local(grad), _local(state["exp_avg"]), _local(state["exp_avg_sq"])]
            block_numel = p.numel() // n
            first = len(b["blocks"])
            b["blocks"] += [(None, coef, block_numel)] * n  # (piece index here, coef, numel of the whole block)
            for blk, lo, hi in (shard.segments(p.shape[0], n) if p.ndim else [(0, 0, 1)]):
                for key, x in zip("pgmv", xs):
                    b[key].append(x[lo:hi] if x.ndim and (lo, hi) != (0, x.shape[0]) else x)
                b["seg"].append(first + blk)
                b["blocks"][first + blk] = (len(b["p"]) - 1, coef, block_numel)
        if group["scale_parameter"]:
            for (device, dtype, _, shard_group), b in buckets.items():
                # (blocks,) sums of squares: this process's pieces, zero for blocks held elsewhere
                norms = torch._foreach_norm(b["p"], 2, dtype=torch.float32 if dtype in _HALF else None) \
                    if b["p"] else []
                zero = torch.zeros((), dtype=_sum_dtype(dtype), device=device)
                b["sumsq"] = partials.add(torch.stack(
                    [zero if i is None else norms[i] for i, _, _ in b["blocks"]]).square_(), shard_group)
        return buckets

    def _update(self, group: dict[str, Any], buckets: dict[tuple, dict[str, list]]) -> None:
        lr = group["lr"]
        beta1, beta2 = group["betas"]
        for (device, dtype, fused, _), b in buckets.items():
            steps = self._step_sizes(b, group["scale_parameter"])
            if b["p"]:
                if fused:
                    self._fused_update(b, steps, beta1, beta2, group["eps"], device)
                else:
                    self._foreach_update(b, steps, beta1, beta2, group["eps"])
            if group["weight_decay"] > 0.0:
                # after the update, with the unscaled lr, as nanoT5 (p + p * (-lr wd) keeps the
                # decay exact in fp32, where p * (1 - lr wd) rounds 1 - lr wd)
                torch._foreach_add_(b["params"], b["params"], alpha=-lr * group["weight_decay"])

    @staticmethod
    def _step_sizes(b: dict[str, list], scale: bool) -> list:
        """Per piece: coef * max(1e-3, rms(its whole matrix)) as 0-d device tensors (or the
        floats if not scaled); b["sumsq"] holds the matrices' complete sums of squares."""
        if not scale:
            return [b["blocks"][k][1] for k in b["seg"]]
        rms = torch._foreach_sqrt(list(b["sumsq"].unbind()))  # a 0-d norm per block, each its own tensor
        torch._foreach_div_(rms, [math.sqrt(numel) for _, _, numel in b["blocks"]])
        torch._foreach_clamp_min_(rms, 1e-3)  # max(1e-3, rms) without reading rms on the host
        torch._foreach_mul_(rms, [coef for _, coef, _ in b["blocks"]])
        return [rms[k] for k in b["seg"]]

    def _fused_update(self, b: dict[str, list], steps: list, beta1: float, beta2: float,
                      eps: float, device: torch.device) -> None:
        # torch's fused AdamW kernel computes, from its own step tensor s (we pass s = 1):
        #     p -= lr_k / (1 - b1^s) * m / (sqrt(v) / sqrt(1 - b2^s) + eps_k)
        #        = lr_k * sqrt(1 - b2) / (1 - b1) * m / (sqrt(v) + eps_k * sqrt(1 - b2))
        # with m, v updated exactly as above. So eps_k = eps / sqrt(1 - b2) and
        # lr_k = step * (1 - b1) / sqrt(1 - b2) give nanoT5's update in one pass over memory;
        # the per-matrix lr_k is a 0-d device tensor, which the kernel reads on the device.
        one = self._ones.get(device)
        if one is None:
            one = self._ones[device] = torch.ones((), dtype=torch.float32, device=device)
        k = (1.0 - beta1) / math.sqrt(1.0 - beta2)
        if isinstance(steps[0], Tensor):
            torch._foreach_mul_(steps, k)
            if device.type != "cpu":  # the CUDA kernel reads a float32 lr
                steps = [s.float() for s in steps]
        else:
            steps = [s * k for s in steps]
        eps_k = eps / math.sqrt(1.0 - beta2)
        for p, g, m, v, lr_k in zip(b["p"], b["g"], b["m"], b["v"], steps):
            torch._fused_adamw_([p], [g], [m], [v], [], [one], lr=lr_k, beta1=beta1, beta2=beta2,
                                weight_decay=0.0, eps=eps_k, amsgrad=False, maximize=False)

    @staticmethod
    def _foreach_update(b: dict[str, list], steps: list, beta1: float, beta2: float, eps: float) -> None:
        ps, gs, ms, vs = b["p"], b["g"], b["m"], b["v"]
        torch._foreach_lerp_(ms, gs, 1.0 - beta1)  # m = b1 m + (1 - b1) g
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_add_(denom, eps)
        if isinstance(steps[0], Tensor):
            torch._foreach_div_(denom, steps)  # (sqrt(v) + eps) / step: p -= m / that
            torch._foreach_addcdiv_(ps, ms, denom, value=-1.0)
        else:
            torch._foreach_addcdiv_(ps, ms, denom, [-s for s in steps])


# ------------------------------------------------------------------------- Adafactor
class Adafactor(torch.optim.Optimizer):
    """Adafactor (Shazeer & Stern 2018) as HF `transformers.Adafactor` with relative_step=False,
    scale_parameter=True, warmup_init=False (nanoT5's configuration), without host syncs.

    Per logical matrix (or vector) p with gradient g, at step t (1-based):
        b2t = 1 - t^decay_rate;  step = lr * max(eps[1], rms(p))  (lr alone if not scale_parameter)
        matrices: R = b2t R + (1 - b2t) mean_cols(g^2 + eps[0]);  C likewise over rows
                  u = g / sqrt(R C^T / mean(R))         (factored second moment)
        vectors:  V = b2t V + (1 - b2t) (g^2 + eps[0]);  u = g / sqrt(V)
        u /= max(1, rms(u) / clip_threshold);  u *= step
        optional momentum: M = beta1 M + (1 - beta1) u;  u = M
        p -= weight_decay * step * p;  p -= u
    Tensors with more than two dims are factored over their last two, as in HF. fp16/bf16
    parameters are updated in fp32 and written back, as in HF.

    Everything global is a sum over rows, so a step first takes, per matrix, the local sums
        sum_i g_ij^2 (for C),  sum_i R_i (for mean(R)),  sum_i g_ij^2 / R_i,  sum p^2
    and, as sum(u^2) = mean(R) sum_j (sum_i g_ij^2 / R_i) / C_j, rms(u) needs no second pass.
    On FSDP2 shards (DTensors, rows on dim 0; R is local there) these sums are completed with one
    all_reduce per step for all parameters (`_Partials`); R and V are sharded like p, C replicated.
    The per-matrix scalars (step, clipping) of all parameters are then computed together with
    foreach ops, and each matrix is updated with one pass: p -= g_ij rsqrt(C_j) rsqrt(R_i) k,
    k = sqrt(mean(R)) step / max(1, rms(u) / clip).
    """

    def __init__(self, params: Iterable, lr: float, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: float | None = None,
                 weight_decay: float = 0.0, scale_parameter: bool = True):
        _check_lr(lr, "Adafactor")
        if len(eps) != 2 or min(eps) < 0:
            raise ValueError(f"Adafactor: eps must be a pair of non-negative floats, got {eps}")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Adafactor: beta1 must be None or in [0, 1), got {beta1}")
        if weight_decay < 0 or clip_threshold <= 0 or decay_rate >= 0:
            raise ValueError("Adafactor: need weight_decay >= 0, clip_threshold > 0, decay_rate < 0")
        defaults = dict(lr=lr, eps=tuple(eps), clip_threshold=clip_threshold, decay_rate=decay_rate,
                        beta1=beta1, weight_decay=weight_decay, scale_parameter=scale_parameter,
                        row_blocks=None)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_row_blocks(self.param_groups[-1], "Adafactor")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # statistics and local sums per parameter; one reduction; every block's step size and
        # update scale at once (foreach); the updates per parameter
        partials = _Partials()
        work = []
        for group in self.param_groups:
            lr = _check_lr(group["lr"], "Adafactor")
            for p, n in zip(group["params"], _blocks_of(group)):
                if p.grad is not None:
                    work.append(self._prepare(p, n, group, lr, partials))
        if work:
            w_sq = [w["w_sq"] for w in work]
            torch._foreach_mul_(w_sq, w_sq)  # norms -> sums of squares, before they are summed
            partials.reduce()
            self._scales(work)
        for w in work:
            self._update(w)
        return loss

    def _prepare(self, p: Tensor, n: int, group: dict[str, Any], lr: float, partials: _Partials) -> dict:
        """Update the local second-moment statistics (R, or V); return the local sums, per block."""
        grad = _grad(p, "Adafactor")
        shard = _Shard(p, "Adafactor")
        if shard.group is not None and p.ndim > 2:
            raise NotImplementedError(f"Adafactor: sharded parameters must be matrices or vectors, got "
                                      f"shape {tuple(p.shape)}")
        g = _local(grad)
        g = g.float() if g.dtype in _HALF else g
        dtype, factored = g.dtype, p.ndim >= 2
        state = self.state[p]
        if not state:
            state["step"] = 0  # host int, as HF: b2t is computed on the host, no sync
            if factored:  # (n, C) column statistics when the matrix holds n row blocks
                col_shape = (n, p.shape[-1]) if n > 1 else p.shape[:-2] + p.shape[-1:]
                state["exp_avg_sq_row"] = _new_state(p, g.shape[:-1], p.shape[:-1], dtype, sharded=True)
                state["exp_avg_sq_col"] = _new_state(p, col_shape, col_shape, dtype, sharded=False)
            else:
                state["exp_avg_sq"] = _new_state(p, g.shape, p.shape, dtype, sharded=True)
            if group["beta1"] is not None:
                state["exp_avg"] = _new_state(p, g.shape, p.shape, dtype, sharded=True)
        state["step"] += 1
        beta2t = 1.0 - state["step"] ** group["decay_rate"]
        eps1 = group["eps"][0]
        w = shard.local
        work = dict(p=p, group=group, lr=lr, n=n, beta2t=beta2t, numel=p.numel() // n, factored=factored)
        if not factored:
            v = _local(state["exp_avg_sq"])
            v.mul_(beta2t).add_(g * g + eps1, alpha=1.0 - beta2t)
            work["u_sq"] = partials.add((g * g).div_(v).sum().reshape(1), shard.group)  # sum(u^2), u = g / sqrt(V)
            work["w_sq"] = partials.add(torch.linalg.vector_norm(w, dtype=dtype).reshape(1), shard.group)
            return work
        # per block b: sums over its rows of g^2 (n, ..., C), of g^2 / R (n, ..., C), of R (n, ...), ||p||
        rows, batch, cols = p.shape[-2], p.shape[:-2], p.shape[-1]
        runs = shard.runs(rows, n) if p.ndim == 2 else [(0, 1, 0, rows)]
        row = _local(state["exp_avg_sq_row"])
        parts = []  # per run: the sums of its blocks
        for b0, nb, lo, hi in runs:
            gs, r, ws = (_blocks(x, nb, lo, hi, p.ndim) for x in (g, row, w))  # (nb, ..., rows, C), ...
            sq = gs * gs  # mean(g^2 + eps1) = mean(g^2) + eps1, added to the (R,) and (C,) means only
            r.mul_(beta2t).add_(sq.mean(dim=-1).add_(eps1), alpha=1.0 - beta2t)
            parts.append((b0, nb, sq.sum(dim=-2), torch.matmul(r.reciprocal().unsqueeze(-2), sq).squeeze(-2),
                          r.sum(dim=-1), torch.linalg.vector_norm(ws.reshape(nb, -1), dim=1, dtype=dtype)))
            del sq
        # a shard holds consecutive blocks: those before and after it add zeros here (their sums
        # come from the processes that hold them)
        first, end = (parts[0][0], parts[-1][0] + parts[-1][1]) if parts else (0, 0)
        for k, (key, tail) in enumerate(zip(("col_sum", "ratio", "row_sum", "w_sq"),
                                            ((*batch, cols), (*batch, cols), batch, ())), start=2):
            pieces = [part[k] for part in parts]
            if first > 0:
                pieces.insert(0, g.new_zeros((first, *tail)))
            if end < n:
                pieces.append(g.new_zeros((n - end, *tail)))
            work[key] = partials.add(pieces[0] if len(pieces) == 1 else torch.cat(pieces), shard.group)
        col = state["exp_avg_sq_col"]
        work.update(runs=runs, rows=rows // n, col=_local(col).view(n, *col.shape[-(p.ndim - 1):]))
        return work

    @staticmethod
    def _scales(work: list[dict]) -> None:
        """For every block of every parameter, from the completed sums, with foreach ops:
        C = b2t C + (1 - b2t) (mean(g^2) + eps1), step = lr max(eps2, rms(p)) (or lr), and
        scale = step / max(1, rms(u) / clip); for matrices k = sqrt(mean(R)) * scale, so that
        the update is g_ij * rsqrt(C_j) * rsqrt(R_i) * k."""
        fact = [w for w in work if w["factored"]]
        if fact:
            cols, sums = [w["col"] for w in fact], [w["col_sum"] for w in fact]
            torch._foreach_div_(sums, [float(w["rows"]) for w in fact])  # means over each block's rows
            torch._foreach_add_(sums, [w["group"]["eps"][0] for w in fact])
            torch._foreach_mul_(sums, [1.0 - w["beta2t"] for w in fact])
            torch._foreach_mul_(cols, [w["beta2t"] for w in fact])
            torch._foreach_add_(cols, sums)
            row_means = [w["row_sum"] for w in fact]
            torch._foreach_div_(row_means, [float(w["rows"]) for w in fact])
            torch._foreach_div_([w["ratio"] for w in fact], cols)
            for w in fact:  # sum(u^2) = mean(R) sum_j (sum_i g_ij^2 / R_i) / C_j, per block
                u_sq = w["ratio"].sum(dim=-1).mul_(w["row_sum"])  # (n, ...)
                w["u_sq"] = u_sq if u_sq.ndim == 1 else u_sq.reshape(w["n"], -1).sum(dim=1)
        scales = [w["u_sq"] for w in work]  # (n,) each: becomes step / max(1, rms(u) / clip)
        torch._foreach_div_(scales, [float(w["numel"]) for w in work])
        torch._foreach_sqrt_(scales)
        torch._foreach_div_(scales, [w["group"]["clip_threshold"] for w in work])
        torch._foreach_clamp_min_(scales, 1.0)
        torch._foreach_reciprocal_(scales)
        scaled = [w for w in work if w["group"]["scale_parameter"]]
        steps = [w["w_sq"] for w in scaled]  # (n,) each: becomes lr * max(eps2, rms(p)), on the device
        if scaled:
            torch._foreach_div_(steps, [float(w["numel"]) for w in scaled])
            torch._foreach_sqrt_(steps)
            torch._foreach_clamp_min_(steps, [w["group"]["eps"][1] for w in scaled])
            torch._foreach_mul_(steps, [w["lr"] for w in scaled])
            torch._foreach_mul_([w["u_sq"] for w in scaled], steps)
        plain = [w for w in work if not w["group"]["scale_parameter"]]
        if plain:
            torch._foreach_mul_([w["u_sq"] for w in plain], [w["lr"] for w in plain])
        for w in work:
            w["step"], w["scale"] = (w["w_sq"] if w["group"]["scale_parameter"] else w["lr"]), w["u_sq"]
        if fact:
            ks = [w["row_sum"] for w in fact]
            torch._foreach_sqrt_(ks)
            torch._foreach_mul_(ks, [w["scale"].view(w["scale"].shape + (1,) * (k.ndim - 1))
                                     for w, k in zip(fact, ks)])
            for w in fact:
                w["k"] = w["row_sum"]

    def _update(self, work: dict) -> None:
        """Apply the update to the local rows."""
        p, group, n = work["p"], work["group"], work["n"]
        state = self.state[p]
        g = _local(p.grad)
        g = g.float() if g.dtype in _HALF else g
        local = _local(p)
        w = local.float() if local.dtype in _HALF else local  # fp32 working copy of a half parameter
        wd, beta1, step = group["weight_decay"], group["beta1"], work["step"]
        decay = None if wd == 0.0 else (-wd * step if isinstance(step, float) else step * -wd)  # (n,) or float
        m = None if beta1 is None else _local(state["exp_avg"])
        if work["factored"]:
            row = _local(state["exp_avg_sq_row"])
            c = work["col"].rsqrt().unsqueeze(-2)  # (n, ..., 1, C)
            k = work["k"].view(*work["k"].shape, 1, 1)  # (n, ..., 1, 1)
            if isinstance(decay, Tensor):
                decay = decay.view(n, *(1,) * p.ndim)  # (n, 1, ..., 1), like the blocked views
            for b0, nb, lo, hi in work["runs"]:
                ws, gs, rs = (_blocks(x, nb, lo, hi, p.ndim) for x in (w, g, row))
                blocks = slice(b0, b0 + nb)
                # u = g * r_i * c_j, r = rsqrt(R / mean(R)), c = rsqrt(C) (Shazeer & Stern, sec. 3)
                r = rs.rsqrt().unsqueeze(-1).mul_(k[blocks])  # (nb, ..., rows, 1): r_i step / max(1, rms(u) / clip)
                gc = gs * c[blocks]  # (nb, ..., rows, C)
                if isinstance(decay, float):  # w -= wd * step * w
                    ws.add_(ws, alpha=decay)
                elif decay is not None:
                    ws.addcmul_(ws, decay[blocks])
                if m is None:
                    ws.addcmul_(gc, r, value=-1.0)
                else:
                    ms = _blocks(m, nb, lo, hi, p.ndim)
                    ms.mul_(beta1).add_(gc.mul_(r), alpha=1.0 - beta1)
                    ws.sub_(ms)
        else:
            update = _local(state["exp_avg_sq"]).rsqrt().mul_(g).mul_(work["scale"].view(()))
            if m is not None:
                update = m.mul_(beta1).add_(update, alpha=1.0 - beta1)
            if isinstance(decay, float):
                w.add_(w, alpha=decay)
            elif decay is not None:
                w.addcmul_(w, decay.view(()))
            w.sub_(update)
        if local.dtype in _HALF:
            local.copy_(w)


def _blocks(x: Tensor, nb: int, lo: int, hi: int, ndim: int) -> Tensor:
    """Local rows [lo, hi) of a matrix-shaped x (a parameter, its gradient or row statistics) as
    nb row blocks: (nb, rows, ...); a tensor with more than 2 dims (one block) as (1, ...)."""
    if ndim > 2:
        return x.unsqueeze(0)
    part = x if (lo, hi) == (0, x.shape[0]) else x[lo:hi]
    return part.view(nb, (hi - lo) // nb, *x.shape[1:])


# ------------------------------------------------------------------------ groups
def _no_decay_types() -> tuple[type, ...]:
    from nanot5.model import (  # lazy: optim imports without the model
        RelativePositionBias,
        RMSNorm,
    )

    return (RMSNorm, RelativePositionBias, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm,
            nn.modules.batchnorm._NormBase)


def _row_blocks(model: nn.Module) -> dict[int, int]:
    """id(param) -> number of T5 matrices fused in it, as every module that has them reports
    (`fused_row_blocks()`, e.g. `T5`); 1 for everything else."""
    blocks = {}
    for module in model.modules():
        if hasattr(module, "fused_row_blocks"):
            named = dict(module.named_parameters())
            for name, n in module.fused_row_blocks().items():
                blocks[id(named[name])] = n
    return blocks


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two param groups: matrices with `weight_decay`, the rest (norm weights, relative position
    biases, vectors, scalars) without. Decided by module type and ndim, never by name.

    Groups carry `param_names` and `row_blocks` (see the module docstring); torch optimizers
    ignore the latter. Asserts that every trainable parameter lands in exactly one group.
    """
    no_decay_types = _no_decay_types()
    decays: dict[int, bool] = {}
    params: dict[int, tuple[str, nn.Parameter]] = {}
    for mod_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            exempt = isinstance(module, no_decay_types) or p.ndim < 2
            params.setdefault(id(p), (f"{mod_name}.{name}" if mod_name else name, p))
            # a tied parameter is exempt if any of its owners says so
            decays[id(p)] = decays.get(id(p), True) and not exempt
    blocks = _row_blocks(model)
    groups = []
    for decay in (True, False):
        chosen = [params[i] for i in params if decays[i] == decay]
        if chosen:
            groups.append(dict(params=[p for _, p in chosen], param_names=[n for n, _ in chosen],
                               weight_decay=weight_decay if decay else 0.0,
                               row_blocks=[blocks.get(id(p), 1) for _, p in chosen]))
    check_param_groups(model, groups)
    return groups


def check_param_groups(model: nn.Module, groups: list[dict[str, Any]]) -> None:
    """Raise ValueError unless every trainable parameter of `model` is in exactly one group
    and every grouped parameter belongs to `model`; the error names the parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    count = Counter(id(p) for g in groups for p in g["params"])
    problems = [f"{n} is in no param group" for n, p in model.named_parameters()
                if p.requires_grad and count[id(p)] == 0]
    problems += [f"{names[i]} is in {c} param groups" for i, c in count.items() if c > 1 and i in names]
    problems += [f"a parameter of shape {tuple(p.shape)} in param group {k} is not in the model"
                 for k, g in enumerate(groups) for p in g["params"] if id(p) not in names]
    if problems:
        raise ValueError("param groups must hold every trainable parameter exactly once: "
                         + "; ".join(problems))


# ------------------------------------------------------------------------ factory
def build_optimizer(name: str, params_or_groups: Iterable, *, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999), eps: Any = None) -> torch.optim.Optimizer:
    """`adamwscale` (nanoT5 pre-training), `adafactor` (T5's), or `adamw` (torch, fused if possible).

    eps defaults: 1e-6 for adamwscale and adamw (nanoT5's HF AdamW), (1e-30, 1e-3) for
    adafactor. Adafactor has no betas (no momentum, decay -0.8, as in nanoT5). Group entries
    such as `weight_decay` override these arguments, as in torch.
    """
    # copies: torch optimizers write their defaults into the group dicts they are given
    params = [dict(p) if isinstance(p, dict) else p for p in params_or_groups]
    if name == "adamwscale":
        return AdamWScale(params, lr=lr, betas=betas, eps=1e-6 if eps is None else eps,
                          weight_decay=weight_decay)
    if name == "adafactor":
        return Adafactor(params, lr=lr, eps=(1e-30, 1e-3) if eps is None else eps,
                         weight_decay=weight_decay)
    if name == "adamw":
        kw = dict(lr=lr, betas=betas, eps=1e-6 if eps is None else eps, weight_decay=weight_decay)
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except RuntimeError:  # a device or dtype without the fused kernel
            return torch.optim.AdamW(params, foreach=True, **kw)
    raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")


# ------------------------------------------------------------------------ schedules
def lr_schedule(name: str, *, base_lr: float, warmup_steps: int, total_steps: int,
                final_cosine: float = 1e-5) -> Callable[[int], float]:
    """The learning rate (absolute, not a multiplier) at 0-based optimizer step `step`.

    - cosine (nanoT5): linear from base_lr/2 to base_lr over warmup_steps, then cosine down to
      final_cosine at total_steps; the values of nanoT5's SequentialLR(LinearLR(start_factor=0.5),
      CosineAnnealingLR(eta_min=final_cosine)). Stays at final_cosine afterwards.
    - legacy (T5's inverse square root): min(1e-2, 1/sqrt(step)) (1e-2 at step 0) for the first
      ceil(0.9 * total_steps) steps, then linear to 0 at total_steps; ignores base_lr.
    - constant: base_lr (after a linear warmup from 0, if warmup_steps > 0).
    - linear: linear warmup from 0, then linear decay to 0 at total_steps.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown lr schedule {name!r}; valid names: {', '.join(SCHEDULERS)}")
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"lr_schedule: need total_steps >= 1 and warmup_steps >= 0, "
                         f"got {total_steps}, {warmup_steps}")
    if name in ("cosine", "linear") and warmup_steps >= total_steps:
        raise ValueError(f"lr_schedule({name!r}): warmup_steps ({warmup_steps}) must be < "
                         f"total_steps ({total_steps})")
    if base_lr < 0 or final_cosine < 0:
        raise ValueError(f"lr_schedule: base_lr and final_cosine must be >= 0, got {base_lr}, {final_cosine}")

    def warmup(step: int, start: float) -> float:  # start * base_lr -> base_lr over warmup_steps
        return base_lr * (start + (1.0 - start) * step / warmup_steps)

    def check(step: int) -> None:
        if step < 0:
            raise ValueError(f"lr schedule: step must be >= 0, got {step}")

    if name == "cosine":
        decay_steps = total_steps - warmup_steps

        def cosine(step: int) -> float:
            check(step)
            if step < warmup_steps:
                return warmup(step, 0.5)
            progress = min(step - warmup_steps, decay_steps) / decay_steps
            return final_cosine + (base_lr - final_cosine) * 0.5 * (1.0 + math.cos(math.pi * progress))

        return cosine

    if name == "legacy":
        logger.warning("lr schedule 'legacy' (T5's inverse square root) does not use base_lr=%g", base_lr)
        isr_steps = math.ceil(total_steps * 0.9)  # same float expression as nanoT5
        tail = total_steps - isr_steps

        def isr(step: int) -> float:
            return 1e-2 if step == 0 else min(1e-2, 1.0 / math.sqrt(step))

        def legacy(step: int) -> float:
            check(step)
            if step < isr_steps:
                return isr(step)
            if step >= total_steps:
                return 0.0
            return isr(isr_steps) * (1.0 - (step - isr_steps) / tail)

        return legacy

    if name == "constant":
        def constant(step: int) -> float:
            check(step)
            return warmup(step, 0.0) if step < warmup_steps else base_lr

        return constant

    def linear(step: int) -> float:
        check(step)
        if step < warmup_steps:
            return warmup(step, 0.0)
        return base_lr * max(0.0, (total_steps - step) / (total_steps - warmup_steps))

    return linear
