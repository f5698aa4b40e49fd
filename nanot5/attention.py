"""T5 attention: masks and three implementations of softmax(q k^T + position bias + mask) v.

T5 never scales the logits by 1/sqrt(D) (the scale is folded into the init of q) and adds a learned
relative position bias (Raffel et al. 2020, section 2.1), so every implementation here runs with
scale 1 and an additive bias:

- `eager`: matmul + softmax with a hand-written backward. The readable reference; the fastest
  training path on the CPU.
- `sdpa`: `F.scaled_dot_product_attention` with bias + mask as one additive float mask. Without
  gradients the CPU runs it in a fused kernel: the fastest CPU evaluation path. With gradients a
  learned bias sends SDPA to its unfused math kernel, slower than eager (bench/attention.py).
- `flex`: `torch.nn.attention.flex_attention` (compiled) with the bias as a `score_mod` that
  looks up the learned bucket table (the table gets its gradient through the kernel) and the
  padding / causal / packing masks as a `BlockMask`, which skips fully masked tiles. No
  (B, H, T, S) tensor ever exists. The GPU training path. torch 2.13 runs it forward-only on the
  CPU (its backward raises NotImplementedError there), so a CPU forward that needs gradients
  falls back to eager (see `choose_attention`). On the CPU it also compiles one kernel per shape
  (static shapes; ~5-60 s each), and after torch's recompile limit (8) runs unfused and ~10x
  slower: use it there only with fixed shapes (pre-training evaluation).

Masks come in two forms, built once per stack forward and shared by all its layers:
additive float masks (eager, sdpa) and block masks (flex). Either form encodes
- padding: a query never sees padded keys;
- causality (decoder self-attention);
- packing: with segment ids (1..k numbering the examples packed into a row, 0 on padding) a
  query sees only keys of its own segment. Padding (segment 0) then only sees padding, so no
  row is ever fully masked in self-attention.

Shapes: B batch, H heads, T query length, S key length, D head dim.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F

IMPLEMENTATIONS = ("eager", "sdpa", "flex", "auto")


# ----------------------------------------------------------------------------- choosing
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def choose_attention(requested: str, device: torch.device, needs_grad: bool, dropout: bool) -> str:
    """The implementation one forward pass runs: `requested` unless it cannot run here.

    auto: flex on CUDA (eager when attention dropout is active); on the CPU eager with gradients
    and sdpa without. Measured (bench/attention.py, t5-v1_1-small, batch 8, 512/114, 2 cores, 3
    runs): training step speed eager : sdpa = 1 : 0.97 (fp32), 1 : 0.91 (bf16); evaluation forward
    eager : sdpa : flex = 1 : 1.03-1.11 : 0.89-0.99 (fp32), 1 : 1.20-1.33 : 1.09-1.39 (bf16).
    sdpa is faster than eager in both dtypes without compiling anything; flex is no faster in fp32
    and its per-shape kernels make it a poor default for variable shapes (generation, fine-tuning
    evaluation). Elsewhere eager.
    flex falls back to eager (one warning per process) where torch cannot run it: a CPU forward
    with gradients (FlexAttention has no CPU backward in torch 2.13), attention dropout (flex has
    no dropout on the probabilities), or a device other than CPU/CUDA.
    """
    if requested == "auto":
        if device.type == "cuda":
            requested = "eager" if dropout else "flex"
        else:
            requested = "sdpa" if device.type == "cpu" and not needs_grad else "eager"
    if requested != "flex":
        return requested
    if device.type not in ("cpu", "cuda"):
        _warn_once("flex-device", f"attention='flex' does not run on {device.type}; using eager")
        return "eager"
    if device.type == "cpu" and needs_grad:
        _warn_once("flex-cpu-grad", "attention='flex' has no backward on the CPU (torch FlexAttention "
                   "is inference-only there): forward passes that need gradients use eager attention")
        return "eager"
    if dropout:
        _warn_once("flex-dropout", "attention='flex' cannot apply attention dropout: training forward "
                   "passes with dropout_rate > 0 use eager attention")
        return "eager"
    return "flex"


# ----------------------------------------------------------------------------- masks
def padding_bias(mask: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """(B, S) 1/0 attention mask -> additive (B, 1, 1, S) bias: 0 where visible, dtype-min where masked."""
    if mask is None:
        return None
    return ((1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min)


def segment_bias(q_segments: torch.Tensor, k_segments: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed rows: (B, T) and (B, S) segment ids -> additive (B, 1, T, S) bias that lets a query see
    only the keys of its own segment (padding, segment 0, sees only padding)."""
    same = q_segments[:, None, :, None] == k_segments[:, None, None, :]
    return (~same).to(dtype) * torch.finfo(dtype).min


def flex_block_mask(batch: int, q_len: int, k_len: int, device: torch.device, causal: bool = False,
                    key_mask: torch.Tensor | None = None, q_segments: torch.Tensor | None = None,
                    k_segments: torch.Tensor | None = None):
    """The `BlockMask` of one attention call, or None when every query sees every key.

    key_mask: (B, S) 1/0 padding mask (ignored when segments are given: segment 0 is padding);
    q_segments, k_segments: (B, T), (B, S) segment ids of packed rows.
    """
    from torch.nn.attention.flex_attention import and_masks, create_block_mask

    mods = []
    if causal:
        mods.append(lambda b, h, q, kv: q >= kv)
    if q_segments is not None:
        mods.append(lambda b, h, q, kv: q_segments[b, q] == k_segments[b, kv])
    elif key_mask is not None:
        key_mask = key_mask.bool()
        mods.append(lambda b, h, q, kv: key_mask[b, kv])
    if not mods:
        return None
    per_row = q_segments is not None or key_mask is not None
    return create_block_mask(and_masks(*mods), batch if per_row else None, None, q_len, k_len,
                             device=device)


def relative_bias_score_mod(offset_bias: torch.Tensor, q_len: int) -> Callable:
    """flex `score_mod` adding T5's learned position bias: score + bias of (head, key - query offset).

    offset_bias: (H, T + S - 1), the learned bucket table looked up (with autograd) at the bucket
    of each key-minus-query offset -(T-1) .. S-1, so the table's gradient flows through the flex
    kernel into this tensor and on to the table. A 2-D index by head and offset is the learnable-
    bias pattern torch's own flex tests check gradients for.
    The function object is created by this one `def`, so compiled flex kernels are reused (torch
    guards on the code object, not on the closure).
    """
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + offset_bias[h, kv_idx - q_idx + (q_len - 1)]

    return score_mod


# ----------------------------------------------------------------------------- eager
def _attention_probs(q, k, bias, mask):
    """softmax(q k^T + bias + mask) in the dtype of q: (B, H, T, S)."""
    s = torch.matmul(q, k.transpose(-1, -2))  # (B, H, T, S), compute dtype
    if bias is not None:
        s = s + bias  # fp32 bias: added before rounding, as HF does under autocast
    if mask is not None:
        if mask.dtype != s.dtype:  # keep masked logits finite in a narrower dtype
            mask = mask.clamp_min(torch.finfo(s.dtype).min).to(s.dtype)
        s = s.add_(mask)  # s is a fresh tensor
    return torch.softmax(s, dim=-1).to(q.dtype)  # statistics in fp32 (autocast) or q's dtype


class _Attention(torch.autograd.Function):
    """softmax(q k^T + bias + mask) v (no 1/sqrt(D) scaling) with a hand-written backward.

    Why not `F.scaled_dot_product_attention`: T5's position bias is learned, and SDPA on CPU
    handles a mask that needs a gradient only in its unfused math fallback. Autograd through
    matmul/add/softmax then keeps fp32 scores and probabilities of every layer; here the one
    saved (B, H, T, S) tensor is the probabilities in the compute dtype, and the backward uses
    the fused softmax-backward kernel: dS = P * (dP - rowsum(dP * P)).
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, mask):
        p = _attention_probs(q, k, bias, mask)
        ctx.save_for_backward(q, k, v, p)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return torch.matmul(p, v)

    @staticmethod
    def backward(ctx, dy):
        q, k, v, p = ctx.saved_tensors
        dp = torch.matmul(dy, v.transpose(-1, -2))  # (B, H, T, S)
        ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
        dbias = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
            dbias = ds.sum(0, keepdim=True, dtype=ctx.bias_dtype)  # (1, H, T, S)
        return (torch.matmul(ds, k), torch.matmul(ds.transpose(-1, -2), q),
                torch.matmul(p.transpose(-1, -2), dy), dbias, None)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                    mask: torch.Tensor | None, dropout: float = 0.0) -> torch.Tensor:
    """Unscaled multi-head attention: q (B, H, T, D), k and v (B, H, S, D) -> (B, H, T, D).

    bias: (1, H, T, S) relative position bias (may require grad); mask: additive (B, 1, 1|T, S).
    """
    if dropout > 0.0:  # dropout on the probabilities (T5's attention dropout): plain autograd
        s = torch.matmul(q, k.transpose(-1, -2))
        s = s if bias is None else s + bias
        s = s if mask is None else s + mask
        p = F.dropout(torch.softmax(s, dim=-1), dropout, training=True)
        return torch.matmul(p.to(v.dtype), v)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias)):
        return _Attention.apply(q, k, v, bias, mask)
    return torch.matmul(_attention_probs(q, k, bias, mask), v)  # inference: no autograd state


# ----------------------------------------------------------------------------- sdpa
def sdpa_mask(bias: torch.Tensor | None, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """bias + mask as one additive (B|1, H|1, T, S) mask in `dtype` (SDPA wants the query's dtype);
    built once per stack forward so that the layers do not each add and cast it."""
    m = bias if mask is None else (mask if bias is None else bias + mask)
    if m is not None and m.dtype != dtype:
        m = m.clamp_min(torch.finfo(dtype).min).to(dtype)  # masked logits stay finite
    return m


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                   mask: torch.Tensor | None, dropout: float = 0.0) -> torch.Tensor:
    """`F.scaled_dot_product_attention` with scale 1 and bias + mask as one additive float mask."""
    m = sdpa_mask(bias, mask, q.dtype)  # a no-op when the stack already combined them (sdpa_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=dropout, scale=1.0)


# ----------------------------------------------------------------------------- flex
_compiled_flex: dict[str, Callable] = {}


def _flex_kernel(device_type: str) -> Callable:
    """`flex_attention` compiled once per device type (flex only fuses under torch.compile).

    CPU: static shapes (one kernel per shape): inductor's CPU flex template fails to build with
    dynamic shapes in torch 2.13. CUDA: torch's default (static first, dynamic on a new shape).
    """
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():  # already inside a compiled region (model.compile): inline it
        return flex_attention
    if device_type not in _compiled_flex:
        _compiled_flex[device_type] = torch.compile(flex_attention, dynamic=False if device_type == "cpu" else None)
    return _compiled_flex[device_type]


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod: Callable | None,
                   block_mask) -> torch.Tensor:
    """FlexAttention with scale 1: q (B, H, T, D), k and v (B, H, S, D) -> (B, H, T, D).

    score_mod: `relative_bias_score_mod` or None; block_mask: `flex_block_mask` or None.
    Fully masked query rows (e.g. packing padding in cross-attention) come out as zeros.
    """
    return _flex_kernel(q.device.type)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias, mask, impl: str = "eager",
           dropout: float = 0.0) -> torch.Tensor:
    """Run one attention call with `impl` (from `choose_attention`; never "auto").

    eager/sdpa: bias is a (1, H, T, S) tensor or None, mask an additive tensor or None;
    flex: bias is a score_mod or None, mask a BlockMask or None.
    """
    if impl == "eager":
        return eager_attention(q, k, v, bias, mask, dropout)
    if impl == "sdpa":
        return sdpa_attention(q, k, v, bias, mask, dropout)
    if impl == "flex":
        if dropout > 0.0:
            raise ValueError("flex attention has no attention dropout (choose_attention picks eager then)")
        return flex_attention(q, k, v, bias, mask)
    raise ValueError(f"unknown attention implementation {impl!r}; expected eager, sdpa or flex")
