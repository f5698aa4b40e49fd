"""T5 encoder-decoder in one file.

Covers T5 v1.1 / Flan-T5 / nanoT5 (gated-GELU FFN, untied lm_head), the original T5
(ReLU FFN, tied embeddings with d_model**-0.5 output scaling) and mT5 / byT5 (v1.1 architecture;
mT5 as saved by transformers 5 ties the head without scaling), selected by `T5Config`.
Architecture: Raffel et al. 2020 (arXiv 1910.10683), section 2.1; v1.1 changes from
google-research/text-to-text-transfer-transformer released_checkpoints.md. The attention
implementations (eager / sdpa / flex) and their masks live in nanot5/attention.py.

Notation in shape comments: B batch, T query length, S key length, H heads, D head dim,
C d_model, F d_ff, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nanot5.attention import (IMPLEMENTATIONS, attend, choose_attention, flex_block_mask,
                              padding_bias, relative_bias_score_mod, sdpa_mask, segment_bias)

# feed_forward_proj "gated-gelu" means the tanh approximation of GELU in the HF/mesh-tf
# checkpoints ("gelu_new"); plain "gelu" is the exact erf form.
_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass
class T5Config:
    """Model hyper-parameters, with Hugging Face `T5Config` field names."""

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 12
    num_decoder_layers: int | None = None  # None: same as num_layers
    num_heads: int = 12
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.0
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"  # "relu" for the original T5
    # True: the output projection is the token embedding, no separate lm_head (original T5; mT5 as
    # transformers 5 saves it)
    tie_word_embeddings: bool = False
    # Multiply the decoder output by d_model**-0.5 before the output projection (mesh-tf; original
    # T5 only). None: same as tie_word_embeddings, which covers original T5 (tied, scaled) and v1.1
    # (untied, unscaled); mT5 and a transformers-5 v1.1 save are tied without scaling.
    scale_decoder_outputs: bool | None = None
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    # Not part of HF's config (runtime choices, never written to config.json):
    gradient_checkpointing: bool = False  # recompute each block's activations in backward
    attention: str = "eager"  # eager | sdpa | flex | auto, see nanot5/attention.py
    lm_head_init: str = "scaled"  # untied head init std: scaled (d_model**-0.5) | hf (1.0), see init_weights

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"T5Config.attention={self.attention!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
        if self.lm_head_init not in ("scaled", "hf"):
            raise ValueError(f"T5Config.lm_head_init={self.lm_head_init!r}; choose scaled or hf")
        self.activation  # validates feed_forward_proj
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate}")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        act = self.feed_forward_proj.removeprefix("gated-")
        if self.feed_forward_proj == "gated-gelu":
            act = "gelu_new"
        if act not in _ACTIVATIONS or self.feed_forward_proj.count("-") > 1:
            raise ValueError(
                f"T5Config.feed_forward_proj={self.feed_forward_proj!r} is not supported; use "
                "'relu', 'gated-gelu' or '[gated-]{relu,gelu,silu}'")
        return act

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "T5Config":
        """A built-in configuration (see `T5Config.names()`), optionally overridden."""
        key = name.split("/")[-1]
        if key not in PRESETS:
            raise ValueError(f"unknown model name {name!r}; built-in names: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})

    @staticmethod
    def names() -> list[str]:
        return list(PRESETS)

    @classmethod
    def from_hf(cls, config: str | Path | dict) -> "T5Config":
        """From an HF `config.json` (a path, a directory holding it, or its dict)."""
        from nanot5.hf import config_from_hf

        return config_from_hf(config)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_V11 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, d_kv=64)
_ORIG = dict(feed_forward_proj="relu", tie_word_embeddings=True, d_kv=64)
PRESETS: dict[str, dict[str, Any]] = {
    # tiny: for tests and smoke runs; real vocabulary so the T5 tokenizer fits
    "t5-v1_1-tiny": dict(_V11, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
    "t5-v1_1-small": dict(_V11, d_model=512, d_ff=1024, num_layers=8, num_heads=6),
    "t5-v1_1-base": dict(_V11, d_model=768, d_ff=2048, num_layers=12, num_heads=12),
    "t5-v1_1-large": dict(_V11, d_model=1024, d_ff=2816, num_layers=24, num_heads=16),
    "t5-v1_1-xl": dict(_V11, d_model=2048, d_ff=5120, num_layers=24, num_heads=32),
    "t5-small": dict(_ORIG, d_model=512, d_ff=2048, num_layers=6, num_heads=8),
    "t5-base": dict(_ORIG, d_model=768, d_ff=3072, num_layers=12, num_heads=12),
    "t5-large": dict(_ORIG, d_model=1024, d_ff=4096, num_layers=24, num_heads=16),
}
PRESETS["nanot5-base"] = PRESETS["t5-v1_1-base"]


# ----------------------------------------------------------------------------- linear layers
# fp32 matmuls: torch sends them to MKL, which on AMD CPUs runs its AVX2 code path; oneDNN's fp32
# GEMM (exact fp32, no reduced-precision math) is up to ~2x faster there and on par elsewhere.
# bf16 (autocast) matmuls already go through oneDNN. Set to False to always use F.linear.
ONEDNN_FP32_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_mm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T through oneDNN: a (M, K), b (N, K) -> (M, N)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """x @ w.T with forward and both backward matmuls through oneDNN."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return _onednn_mm_t(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
        dx = _onednn_mm_t(dy2, w.t()).view(x.shape) if ctx.needs_input_grad[0] else None
        dw = _onednn_mm_t(dy2.t(), x.reshape(-1, x.shape[-1]).t()) if ctx.needs_input_grad[1] else None
        return dx, dw


def _use_onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (ONEDNN_FP32_LINEAR and x.dtype == w.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0)  # no FlopCounterMode, FakeTensor, ...


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T (no bias); fp32 CPU matmuls in eager mode go through oneDNN (see above)."""
    if _use_onednn(x, w):
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
            return _OneDNNLinear.apply(x, w)
        return _onednn_mm_t(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)


def matmul_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T for 2-D a (M, K) and b (N, K), no autograd; through oneDNN where `linear` would be."""
    return _onednn_mm_t(a, b) if _use_onednn(a, b) else torch.matmul(a, b.t())


class Linear(nn.Linear):
    """Bias-free `nn.Linear` (same parameter name and init) that calls `linear`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class RMSNorm(nn.Module):
    """Scale-only layer norm: no mean subtraction, no bias (T5's LayerNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 even under autocast: bf16 sums of squares lose too much.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> torch.Tensor:
    """Map key-minus-query offsets to bucket ids (mesh-tf `_relative_position_bucket`).

    Half the buckets hold exact small offsets, the rest cover offsets up to max_distance
    on a log scale; bidirectional splits the buckets between the two signs.
    """
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:  # causal: only keys at or before the query are visible
        distance = (-relative_position).clamp_min(0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log-spaced buckets; distance 0 gives log(0) = -inf but is_small masks it out
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp_max(num_buckets - 1)
    return bucket + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """Learned per-head scalar bias for each bucket of key-query offset, added to attention logits."""

    def __init__(self, cfg: T5Config, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.weight = nn.Parameter(torch.empty(self.num_buckets, cfg.num_heads))

    def forward(self, q_len: int, k_len: int, q_offset: int = 0) -> torch.Tensor:
        device = self.weight.device
        q_pos = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]
        k_pos = torch.arange(k_len, device=device)[None, :]
        buckets = relative_position_bucket(k_pos - q_pos, self.bidirectional,
                                           self.num_buckets, self.max_distance)  # (T, S)
        return F.embedding(buckets, self.weight).permute(2, 0, 1).unsqueeze(0)  # (1, H, T, S)

    def score_mod(self, q_len: int, k_len: int):
        """The same bias as a flex `score_mod`: the table looked up once per key-minus-query offset."""
        offsets = torch.arange(-(q_len - 1), k_len, device=self.weight.device)  # (T + S - 1,)
        buckets = relative_position_bucket(offsets, self.bidirectional, self.num_buckets, self.max_distance)
        offset_bias = F.embedding(buckets, self.weight).t().contiguous()  # (H, T + S - 1)
        return relative_bias_score_mod(offset_bias, q_len)


class Attention(nn.Module):
    """Multi-head attention without logit scaling (T5 folds 1/sqrt(D) into the init of q).

    Self-attention projects q, k, v with one fused matmul; cross-attention projects q from the
    decoder and k, v (fused) from the encoder output.
    """

    def __init__(self, cfg: T5Config, cross: bool):
        super().__init__()
        self.n_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        inner = cfg.num_heads * cfg.d_kv
        self.cross = cross
        if cross:
            self.q = Linear(cfg.d_model, inner)
            self.kv = Linear(cfg.d_model, 2 * inner)
        else:
            self.qkv = Linear(cfg.d_model, 3 * inner)
        self.o = Linear(inner, cfg.d_model)
        self.dropout = cfg.dropout_rate

    def heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H*D) -> (B, H, T, D)
        return x.unflatten(-1, (self.n_heads, self.d_kv)).transpose(1, 2)

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(memory).chunk(2, dim=-1)
        return self.heads(k), self.heads(v)  # (B, H, S, D) each

    def forward(self, x: torch.Tensor, bias, mask, memory: torch.Tensor | None = None,
                cache: dict | None = None, *, impl: str = "eager") -> torch.Tensor:
        # x: (B, T, C); bias, mask: in the form `impl` takes (nanot5.attention.attend): eager/sdpa
        # (1, H, T, S) position bias or None and additive (B, 1, 1|T, S) mask or None; flex a
        # score_mod and a BlockMask (or None)
        if self.cross:
            q = self.heads(self.q(x))
            if cache is not None:  # generation: encoder k, v computed once
                if "k" not in cache:  # contiguous, or every step's matmuls would copy them
                    cache["k"], cache["v"] = (t.contiguous() for t in self.project_kv(memory))
                k, v = cache["k"], cache["v"]
            else:
                k, v = self.project_kv(memory)
        else:
            q, k, v = (self.heads(t) for t in self.qkv(x).chunk(3, dim=-1))
            if cache is not None:  # generation: write this step's keys and values into the cache
                if "k" not in cache:  # preallocated for all steps: no reallocation per token
                    shape = (k.shape[0], k.shape[1], cache["max_len"], k.shape[3])
                    cache["k"], cache["v"], cache["len"] = k.new_empty(shape), v.new_empty(shape), 0
                t0, t1 = cache["len"], cache["len"] + k.shape[2]
                cache["k"][:, :, t0:t1], cache["v"][:, :, t0:t1], cache["len"] = k, v, t1
                k, v = cache["k"][:, :, :t1], cache["v"][:, :, :t1]  # (B, H, t1, D) views
        drop = self.dropout if self.training else 0.0
        y = attend(q, k, v, bias, mask, impl, drop)  # (B, H, T, D)
        return self.o(y.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """wo(act(wi_0 x) * wi_1 x) when gated (v1.1), wo(act(wi x)) otherwise; wi_0/wi_1 fused."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.gated = cfg.is_gated
        self.wi = Linear(cfg.d_model, cfg.d_ff * (2 if self.gated else 1))
        self.wo = Linear(cfg.d_ff, cfg.d_model)
        self.act = _ACTIVATIONS[cfg.activation]
        self.drop = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.wi(x)  # (B, T, 2F) or (B, T, F)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.wo(self.drop(h))


class Block(nn.Module):
    """Pre-norm residual block: self-attention, [cross-attention], feed-forward."""

    def __init__(self, cfg: T5Config, is_decoder: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.attn = Attention(cfg, cross=False)
        if is_decoder:
            self.cross_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
            self.cross = Attention(cfg, cross=True)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.ffn = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout_rate)

    def forward(self, x, self_bias, self_mask=None, memory=None, cross_mask=None, cache=None, *,
                impl: str = "eager"):
        # x: (B, T, C); eager/sdpa: self_bias (1, H, T, T), masks additive (B, 1, 1|T, T or S) or None;
        # flex (impl="flex"): self_bias a score_mod, masks BlockMasks (see Stack.attention_inputs)
        x = x + self.drop(self.attn(self.attn_norm(x), self_bias, self_mask,
                                    cache=None if cache is None else cache["self"], impl=impl))
        if memory is not None:
            x = x + self.drop(self.cross(self.cross_norm(x), None, cross_mask, memory,
                                         cache=None if cache is None else cache["cross"], impl=impl))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class Stack(nn.Module):
    """Encoder or decoder: blocks sharing one relative position bias, then a final norm."""

    def __init__(self, cfg: T5Config, is_decoder: bool):
        super().__init__()
        self.cfg = cfg
        self.is_decoder = is_decoder
        n = cfg.num_decoder_layers if is_decoder else cfg.num_layers
        self.rel_bias = RelativePositionBias(cfg, bidirectional=not is_decoder)
        self.blocks = nn.ModuleList(Block(cfg, is_decoder) for _ in range(n))
        self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.drop = nn.Dropout(cfg.dropout_rate)

    def position_bias(self, T: int) -> torch.Tensor:
        """Relative position bias, causal-masked in the decoder: (1, H, T, T)."""
        bias = self.rel_bias(T, T)
        if self.is_decoder:
            causal = torch.ones(T, T, dtype=torch.bool, device=bias.device).triu(1)
            bias = bias.masked_fill(causal, torch.finfo(bias.dtype).min)
        return bias

    def attention_inputs(self, impl: str, x: torch.Tensor, mask: torch.Tensor | None,
                         memory: torch.Tensor | None, memory_mask: torch.Tensor | None,
                         segment_ids: torch.Tensor | None, memory_segment_ids: torch.Tensor | None):
        """(self-attention bias, self-attention mask, cross-attention mask) of one forward, in the form
        `impl` takes; built once and shared by all blocks.

        Packed rows: within one example the key-minus-query offsets are those of the example alone
        (its tokens are contiguous), so the relative position bias needs no change; the segment
        masks alone keep the examples apart.
        """
        B, T = x.shape[:2]
        if impl == "flex":
            self_mask = flex_block_mask(B, T, T, x.device, causal=self.is_decoder, key_mask=mask,
                                        q_segments=segment_ids, k_segments=segment_ids)
            cross_mask = None if memory is None else flex_block_mask(
                B, T, memory.shape[1], x.device, key_mask=memory_mask, q_segments=segment_ids,
                k_segments=memory_segment_ids)
            return self.rel_bias.score_mod(T, T), self_mask, cross_mask
        if segment_ids is not None:
            self_mask = segment_bias(segment_ids, segment_ids)
            cross_mask = None if memory is None else segment_bias(segment_ids, memory_segment_ids)
        else:
            self_mask, cross_mask = padding_bias(mask), padding_bias(memory_mask)
        bias = self.position_bias(T)
        if impl == "sdpa":  # one additive mask per attention type, in the dtype attention runs in
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            return None, sdpa_mask(bias, self_mask, dtype), sdpa_mask(None, cross_mask, dtype)
        return bias, self_mask, cross_mask

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None, *,
                segment_ids: torch.Tensor | None = None, memory_segment_ids: torch.Tensor | None = None):
        # x: (B, T, C) embeddings; mask: (B, T) and memory_mask: (B, S) 1/0 padding masks;
        # segment_ids: (B, T), memory_segment_ids: (B, S) packed rows (1..k, 0 on padding); they
        # replace the padding masks
        if segment_ids is not None and memory is not None and memory_segment_ids is None:
            raise ValueError("packed decoder rows (segment_ids) need the encoder's memory_segment_ids")
        impl = choose_attention(self.cfg.attention, x.device, torch.is_grad_enabled(),
                                dropout=self.training and self.cfg.dropout_rate > 0)
        bias, self_mask, cross_mask = self.attention_inputs(impl, x, mask, memory, memory_mask,
                                                            segment_ids, memory_segment_ids)
        x = self.drop(x)
        for block in self.blocks:
            if self.cfg.gradient_checkpointing and self.training:
                x = checkpoint(block, x, bias, self_mask, memory, cross_mask, impl=impl, use_reentrant=False)
            else:
                x = block(x, bias, self_mask, memory, cross_mask, impl=impl)
        return self.drop(self.final_norm(x))


# ----------------------------------------------------------------------------- loss
LOSS_CHUNK_BYTES = 32 << 20  # fp32 logits of one chunk of the chunked loss (rows = this / (4 V))


def _chunked_lm_loss(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, rows: int,
                     need_dh: bool, need_dw: bool):
    """Summed cross-entropy of the logits h @ w.T, `rows` target positions at a time, and its
    gradients with respect to h and w (fp32 softmax statistics, matmuls in h's dtype).

    h: (N, C), w: (V, C), labels: (N,) with -100 where ignored -> (loss sum, dh or None, dw or None).
    The gradient of the summed cross-entropy with respect to the logits is softmax - onehot(label)
    on counted rows and 0 on ignored ones, so each chunk's share of dh and dw is finished while its
    logits are at hand; only (rows, V) logits exist at any time.
    """
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    dh = torch.empty_like(h) if need_dh else None
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_dw else None
    for i in range(0, h.shape[0], rows):
        hc, yc = h[i:i + rows], labels[i:i + rows]  # (n, C), (n,)
        logits = matmul_t(hc, w).float()  # (n, V): the one (n, V) buffer, reused in place below
        counted = yc != -100
        target = yc.clamp_min(0)[:, None]  # (n, 1)
        target_logit = logits.gather(1, target)[:, 0]
        top = logits.amax(dim=-1, keepdim=True)  # logsumexp = top + log(sum(exp(logits - top)))
        e = logits.sub_(top).exp_()
        norm = e.sum(dim=-1)
        total += torch.where(counted, top[:, 0] + norm.log() - target_logit, 0.0).sum()
        if need_dh or need_dw:
            g = e.div_(norm[:, None])  # softmax
            g.scatter_add_(1, target, torch.full_like(top, -1.0))  # - onehot(label)
            g = g.mul_(counted[:, None]).to(h.dtype)
            if need_dh:
                dh[i:i + rows] = matmul_t(g, w.t())  # (n, C)
            if need_dw:
                dw += matmul_t(g.t(), hc.t())  # (V, C), accumulated in fp32
    return total, dh, dw


class _ChunkedLMLoss(torch.autograd.Function):
    """`_chunked_lm_loss` as an autograd op: the gradients are computed in forward (no logits are
    kept or recomputed) and scaled by the incoming gradient in backward."""

    @staticmethod
    def forward(ctx, h, w, labels, rows):
        total, dh, dw = _chunked_lm_loss(h, w, labels, rows, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(dh, dw)
        ctx.w_dtype = w.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        dh = None if dh is None else dh * grad.to(dh.dtype)
        dw = None if dw is None else (dw * grad).to(ctx.w_dtype)
        return dh, dw, None, None


def chunked_lm_loss(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor,
                    rows: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of h @ w.T against labels (-100 ignored) without the (N, V) logits.

    h: (N, C) and w: (V, C) in the matmul dtype; rows: target positions per chunk (default: about
    LOSS_CHUNK_BYTES of fp32 logits). Equals F.cross_entropy(h @ w.T, labels, reduction="sum")
    and its gradients, up to float rounding.
    """
    rows = rows or max(1, LOSS_CHUNK_BYTES // (4 * w.shape[0]))
    if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
        return _ChunkedLMLoss.apply(h, w, labels, rows)
    return _chunked_lm_loss(h, w, labels, rows, False, False)[0]


@dataclass
class Seq2SeqOutput:
    logits: torch.Tensor | None  # (B, T, V); None when T5.forward(..., return_logits=False)
    loss: torch.Tensor | None = None
    encoder_hidden: torch.Tensor | None = field(default=None, repr=False)


class T5(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config, is_decoder=False)
        self.decoder = Stack(config, is_decoder=True)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.d_model, config.vocab_size)
        self.init_weights()

    # ----------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self) -> None:
        """T5 v1.1 initialisation (mesh-tf, as HF `T5PreTrainedModel._init_weights`).

        Each matrix is N(0, fan_in**-0.5), except q whose std also folds in the missing
        1/sqrt(d_kv) logit scaling, i.e. (d_model * d_kv)**-0.5, and the token embedding (std 1).
        The untied lm_head depends on `config.lm_head_init`:
        - "scaled" (default): std d_model**-0.5, like every other input-side matrix. A deliberate
          deviation from HF and nanoT5: their std 1.0 gives logits ~sqrt(d_model) times too large
          at init (nanoT5 issue #25).
        - "hf": std 1.0, exactly HF `T5ForConditionalGeneration._init_weights` and nanoT5. In a
          short pre-training run it changes the held-out loss and the ranking of optimizers (issue 16).
        """
        cfg = self.config
        d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
        nn.init.normal_(self.shared.weight, std=1.0)
        if not cfg.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=1.0 if cfg.lm_head_init == "hf" else d ** -0.5)
        for stack in (self.encoder, self.decoder):
            nn.init.normal_(stack.rel_bias.weight, std=d ** -0.5)
            for module in stack.modules():
                if isinstance(module, RMSNorm):
                    nn.init.ones_(module.weight)
                elif isinstance(module, Attention):
                    w_q = module.q.weight if module.cross else module.qkv.weight[:inner]
                    w_kv = module.kv.weight if module.cross else module.qkv.weight[inner:]
                    nn.init.normal_(w_q, std=(d * cfg.d_kv) ** -0.5)
                    nn.init.normal_(w_kv, std=d ** -0.5)
                    nn.init.normal_(module.o.weight, std=inner ** -0.5)
                elif isinstance(module, FeedForward):
                    nn.init.normal_(module.wi.weight, std=d ** -0.5)
                    nn.init.normal_(module.wo.weight, std=cfg.d_ff ** -0.5)

    # -------------------------------------------------------------- forward
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
               segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        # input_ids: (B, S); attention_mask: (B, S) 1/0; segment_ids: (B, S) packed rows
        return self.encoder(self.shared(input_ids), attention_mask, segment_ids=segment_ids)  # (B, S, C)

    def head_weight(self) -> torch.Tensor:
        """The output projection (V, C): the token embedding when tied, else lm_head."""
        return self.shared.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def head_input(self, h: torch.Tensor) -> torch.Tensor:
        """The decoder output as the output projection sees it: original T5 multiplies it by
        d_model**-0.5 first (mesh-tf; `config.scale_decoder_outputs`)."""
        return h * self.config.d_model ** -0.5 if self.config.scale_decoder_outputs else h

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        return linear(self.head_input(h), self.head_weight())  # (..., V)

    def lm_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the non-(-100) labels without materialising the logits:
        h (B, T, C), labels (B, T). Same value and gradients as the plain path (chunked_lm_loss)."""
        x, w = self.head_input(h), self.head_weight()
        if torch.is_autocast_enabled(x.device.type):  # the dtype the plain path's matmul runs in
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w = x.to(dtype), w.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            total = chunked_lm_loss(x.flatten(0, 1), w, labels.flatten())
        return total / (labels != -100).sum()

    def shift_right(self, labels: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder inputs: start token, then labels[:-1], with -100 replaced by pad.

        Packed rows (segment_ids (B, T)): every segment starts with its own start token, and
        padding (segment 0) gets pad.
        """
        cfg = self.config
        start = torch.full_like(labels[:, :1], cfg.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        if segment_ids is not None:
            first = torch.ones_like(segment_ids, dtype=torch.bool)  # a segment starts here
            first[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
            shifted = shifted.masked_fill(first, cfg.decoder_start_token_id)
            shifted = shifted.masked_fill(segment_ids == 0, cfg.pad_token_id)
        return shifted.masked_fill(shifted == -100, cfg.pad_token_id)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None,
                encoder_hidden: torch.Tensor | None = None, *,
                encoder_segment_ids: torch.Tensor | None = None,
                decoder_segment_ids: torch.Tensor | None = None,
                return_logits: bool = True) -> Seq2SeqOutput:
        """Logits and (with labels) the mean cross-entropy over the labels that are not -100.

        input_ids: (B, S); attention_mask: (B, S) 1/0; labels: (B, T) with -100 where ignored;
        decoder_input_ids: (B, T), default shift_right(labels); decoder_attention_mask: (B, T) 1/0;
        encoder_hidden: (B, S, C) to skip the encoder.
        Packing: encoder_segment_ids (B, S) and decoder_segment_ids (B, T) number the examples
        packed into a row 1..k (example j: encoder segment j, decoder segment j), 0 on padding.
        Attention then stays within each example (encoder block-diagonal, decoder causal within
        its segment, decoder segment j sees encoder segment j), decoder inputs restart per segment,
        and the attention masks may be left out (given, they are applied as well).
        return_logits=False (with labels): the loss is computed in chunks of target positions and
        the (B, T, V) logits never exist (less memory in training); out.logits is then None.
        """
        if (encoder_segment_ids is None) != (decoder_segment_ids is None):
            raise ValueError("T5.forward: give encoder_segment_ids and decoder_segment_ids together")
        if encoder_segment_ids is not None:  # masks given as well: padding becomes segment 0
            if attention_mask is not None:
                encoder_segment_ids = encoder_segment_ids.masked_fill(attention_mask == 0, 0)
            if decoder_attention_mask is not None:
                decoder_segment_ids = decoder_segment_ids.masked_fill(decoder_attention_mask == 0, 0)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5.forward needs labels or decoder_input_ids")
            decoder_input_ids = self.shift_right(labels, decoder_segment_ids)
        if encoder_hidden is None:
            encoder_hidden = self.encode(input_ids, attention_mask, segment_ids=encoder_segment_ids)
        h = self.decoder(self.shared(decoder_input_ids), decoder_attention_mask,
                         memory=encoder_hidden, memory_mask=attention_mask,
                         segment_ids=decoder_segment_ids, memory_segment_ids=encoder_segment_ids)  # (B, T, C)
        if labels is not None and not return_logits:
            return Seq2SeqOutput(logits=None, loss=self.lm_loss(h, labels), encoder_hidden=encoder_hidden)
        logits = self.lm_logits(h)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return Seq2SeqOutput(logits=logits, loss=loss, encoder_hidden=encoder_hidden)

    # ----------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 128, eos_token_id: int | None = None, *, num_beams: int = 1,
                 length_penalty: float = 1.0, early_stopping: bool | str = False, no_repeat_ngram_size: int = 0,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 min_new_tokens: int = 0, num_return_sequences: int = 1,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy decoding, beam search or sampling with a key/value cache (`nanot5.generation`).

        input_ids: (B, S) token ids, attention_mask: (B, S) 1/0. Returns (B * num_return_sequences, L)
        new tokens (no start token), L <= max_new_tokens: decoding stops once every row (every
        input's beam search) is done; positions after a row's EOS hold pad_token_id. eos_token_id:
        None for the config's, negative to never stop early. Semantics and defaults as HF `generate`
        except top_k (0: off; HF's default is 50):
          num_beams > 1: beam search, hypotheses scored sum_logprob / new_len ** length_penalty;
            early_stopping True / False / "never" as in HF;
          do_sample: sample from softmax(logits / temperature) after top_k / top_p filtering,
            drawing from `generator` (seed it to reproduce; None: torch's global RNG); with
            num_beams > 1, beam sampling;
          min_new_tokens: EOS suppressed before that many new tokens;
          no_repeat_ngram_size: no n-gram of that size occurs twice in a row's decoder inputs;
          num_return_sequences: the best r hypotheses of each input (r <= num_beams), or r samples
            per input; rows i * r .. i * r + r - 1 belong to input i.
        Arguments are checked (ValueError naming the argument).
        """
        from nanot5.generation import generate

        return generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                        num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                        no_repeat_ngram_size=no_repeat_ngram_size, do_sample=do_sample, temperature=temperature,
                        top_k=top_k, top_p=top_p, min_new_tokens=min_new_tokens,
                        num_return_sequences=num_return_sequences, generator=generator)

    # ---------------------------------------------------------------- utils
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def fused_row_blocks(self) -> dict[str, int]:
        """Parameter name -> how many equal row blocks (separate T5 matrices) it fuses along dim 0:
        3 for self-attention q/k/v, 2 for cross-attention k/v and the gated FFN's wi_0/wi_1.
        Optimizers that treat every T5 matrix on its own (AdamWScale's RMS, Adafactor) read this."""
        out = {}
        for name, module in self.named_modules():
            if isinstance(module, Attention):
                out[f"{name}.{'kv' if module.cross else 'qkv'}.weight"] = 2 if module.cross else 3
            elif isinstance(module, FeedForward) and module.gated:
                out[f"{name}.wi.weight"] = 2
        return out

    @classmethod
    def from_hf(cls, path_or_name: str | Path, **kwargs) -> "T5":
        """Load an HF `T5ForConditionalGeneration` directory (or hub name, when online)."""
        from nanot5.hf import load_hf

        return load_hf(path_or_name, **kwargs)

    def save_hf(self, out_dir: str | Path) -> None:
        """Write config.json + model.safetensors that `transformers` loads as T5ForConditionalGeneration."""
        from nanot5.hf import save_hf

        save_hf(self, out_dir)


def flops_per_step(cfg: T5Config, batch: int, input_len: int, target_len: int) -> float:
    """Matmul FLOPs of one forward+backward pass (backward = 2x forward), attention included.

    Embedding lookups, norms and softmax are left out, as is customary for MFU (PaLM, appendix B).
    """
    d, f, inner, v = cfg.d_model, cfg.d_ff, cfg.num_heads * cfg.d_kv, cfg.vocab_size
    ffn = 2 * d * f * (3 if cfg.is_gated else 2)  # per token, forward
    enc = cfg.num_layers * input_len * (2 * d * 4 * inner + ffn + 4 * input_len * inner)
    # decoder token: self q,k,v,o and cross q,o projections, FFN, self and cross attention
    dec_tok = 2 * d * inner * 6 + ffn + 4 * target_len * inner + 4 * input_len * inner
    dec = cfg.num_decoder_layers * (target_len * dec_tok + input_len * 2 * d * 2 * inner)  # + cross k,v
    head = target_len * 2 * d * v
    return 3.0 * batch * (enc + dec + head)
