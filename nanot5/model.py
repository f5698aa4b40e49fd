"""T5 encoder-decoder in one file.

Covers T5 v1.1 / Flan-T5 / nanoT5 (gated-GELU FFN, untied lm_head) and the original T5
(ReLU FFN, tied embeddings with d_model**-0.5 output scaling), selected by `T5Config`.
Architecture: Raffel et al. 2020 (arXiv 1910.10683), section 2.1; v1.1 changes from
google-research/text-to-text-transfer-transformer released_checkpoints.md.

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
    tie_word_embeddings: bool = False  # True for the original T5
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    # Not part of HF's config: recompute each block's activations in backward to save memory.
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
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


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T (no bias); fp32 CPU matmuls in eager mode go through oneDNN (see above)."""
    if (ONEDNN_FP32_LINEAR and x.dtype == w.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0):  # no FlopCounterMode, FakeTensor, ...
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
            return _OneDNNLinear.apply(x, w)
        return _onednn_mm_t(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)


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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
              mask: torch.Tensor | None, dropout: float = 0.0) -> torch.Tensor:
    """Unscaled multi-head attention: q (B, H, T, D), k and v (B, H, S, D) -> (B, H, T, D).

    bias: (1, H, T, S) relative position bias (may require grad); mask: additive (B, 1, 1, S).
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

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None,
                memory: torch.Tensor | None = None, cache: dict | None = None) -> torch.Tensor:
        # x: (B, T, C); bias: (1, H, T, S) position bias or None; mask: additive (B, 1, 1, S) or None
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
        y = attention(q, k, v, bias, mask, drop)  # (B, H, T, D)
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

    def forward(self, x, self_bias, self_mask=None, memory=None, cross_mask=None, cache=None):
        # x: (B, T, C); self_bias: (1, H, T, T); masks: additive (B, 1, 1, T or S) or None
        x = x + self.drop(self.attn(self.attn_norm(x), self_bias, self_mask,
                                    cache=None if cache is None else cache["self"]))
        if memory is not None:
            x = x + self.drop(self.cross(self.cross_norm(x), None, cross_mask, memory,
                                         cache=None if cache is None else cache["cross"]))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


def padding_bias(mask: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """(B, S) 1/0 attention mask -> additive (B, 1, 1, S) bias: 0 where visible, dtype-min where masked."""
    if mask is None:
        return None
    return ((1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min)


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None):
        # x: (B, T, C) embeddings; mask: (B, T) and memory_mask: (B, S) 1/0 padding masks
        bias, self_mask, cross_mask = self.position_bias(x.shape[1]), padding_bias(mask), padding_bias(memory_mask)
        x = self.drop(x)
        for block in self.blocks:
            if self.cfg.gradient_checkpointing and self.training:
                x = checkpoint(block, x, bias, self_mask, memory, cross_mask, use_reentrant=False)
            else:
                x = block(x, bias, self_mask, memory, cross_mask)
        return self.drop(self.final_norm(x))


@dataclass
class Seq2SeqOutput:
    logits: torch.Tensor  # (B, T, V)
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
        Deviation: HF draws the untied lm_head with std 1.0, which gives logits ~sqrt(d_model) times
        too large at init (nanoT5 issue #25); we use d_model**-0.5 like every other input-side matrix.
        """
        cfg = self.config
        d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
        nn.init.normal_(self.shared.weight, std=1.0)
        if not cfg.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=d ** -0.5)
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
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(self.shared(input_ids), attention_mask)  # (B, S, C)

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            # original T5 rescales before the tied output projection (mesh-tf)
            return linear(h * self.config.d_model ** -0.5, self.shared.weight)
        return self.lm_head(h)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs: start token, then labels[:-1], with -100 replaced by pad."""
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None,
                encoder_hidden: torch.Tensor | None = None) -> Seq2SeqOutput:
        # input_ids: (B, S); labels: (B, T) with -100 where ignored
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5.forward needs labels or decoder_input_ids")
            decoder_input_ids = self.shift_right(labels)
        if encoder_hidden is None:
            encoder_hidden = self.encode(input_ids, attention_mask)
        h = self.decoder(self.shared(decoder_input_ids), decoder_attention_mask,
                         memory=encoder_hidden, memory_mask=attention_mask)  # (B, T, C)
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
