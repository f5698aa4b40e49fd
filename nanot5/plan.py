"""Memory plan: what one training process keeps on its accelerator, from the config alone.

    nanot5 plan preset=t5-xl [distributed.strategy=fsdp] [world_size=8] [memory_gb=80] [key=value ...]

Per device, for one optimizer step of the configured run (fp32 master weights, `precision` for
the compute, the micro-batch optim.batch_size / optim.grad_acc / world_size):

- parameters: fp32 weights, 1/world_size of each under FSDP (torch.chunk rows, so the first
  ranks hold the rounded-up share), plus the compute-dtype copies that exist during the step:
  FSDP2's gathered parameters (the root's for the whole forward and backward, as FSDP2 does not
  reshard the root after forward; two blocks at a time otherwise, the current and the prefetched
  one) or, without FSDP under bf16/fp16 autocast, the cast copies of every matmul weight that the
  forward keeps for backward;
- gradients: fp32, sharded under FSDP (plus the current block's unsharded ones); DDP keeps a
  second flat copy in its all-reduce buckets (gradient_as_bucket_view=False);
- optimizer state: AdamWScale and AdamW two fp32 moments per element; Adafactor a row and a
  column statistic per T5 matrix (fused row blocks count as separate matrices) and a full
  second moment for vectors;
- activations: the tensors the forward saves for backward, layer by layer from model.py's code
  paths (`_saved_per_layer`), for the configured micro-batch and lengths (pre-training: input
  length and the span-corruption target length; fine-tuning: the maximum lengths), with and
  without activation checkpointing (then a block keeps its input and recomputes the rest);
- peak: the largest total alive at once, walking the step: the end of the forward, the backward
  block by block (a block's saved tensors are freed as its gradients appear, next to the
  temporaries of its backward), and the optimizer step (all gradients plus its temporaries).

Not counted: the CUDA context and caching-allocator slack (a few GB on a GPU: keep a margin),
communication buffers beyond FSDP2's all-gather/reduce-scatter copies, dropout masks (nanot5's
pre-training runs without dropout), and torch.compile's buffers. The estimate is measured
against the CPU allocator's peak for fp32 training of tiny and small models (tests/test_plan.py);
the bf16 terms follow the same code paths with the dtypes autocast and FSDP2's mixed-precision
policy give them, and are not measured on this machine.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

from nanot5.config import Config, ConfigError, load_config

GB = 1e9
_HALF_PRECISIONS = ("bf16", "fp16")


@dataclass(frozen=True)
class _Unit:
    """A stretch of the backward pass: what the forward saved for it, the parameters whose
    gradients it produces, the temporaries of its backward, and its weights' autocast copies."""

    name: str
    saved: int  # bytes
    params: int  # elements
    transient: int  # bytes
    casts: int = 0  # bytes of compute-dtype weight copies the forward saved (autocast without FSDP)
    root: bool = False  # outside the blocks: FSDP2's root group


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device; `peak` and `fits` for the configured activation checkpointing,
    `peak_other` for the other setting. See the module docstring for what each term holds."""

    model: str
    num_parameters: int
    world_size: int
    strategy: str  # single | ddp | fsdp
    precision: str
    optimizer: str
    micro_batch: int
    input_length: int
    target_length: int
    checkpointing: bool
    parameters: int  # fp32 weights held by this device (its shards under FSDP)
    gathered: int  # compute-dtype weight copies at the peak (FSDP2 all-gathers, autocast casts)
    gradients: int
    optimizer_state: int
    activations: int  # saved for backward, without activation checkpointing
    activations_checkpointed: int  # saved for backward, with it
    peak: int
    peak_other: int
    memory: int  # the device's bytes
    breakdown: dict = field(default_factory=dict, compare=False)  # where the peak is, and its parts

    @property
    def fits(self) -> bool:
        return self.peak <= self.memory

    def table(self) -> str:
        """A readable table (GB = 1e9 bytes)."""
        ck = "on" if self.checkpointing else "off"
        other = "off" if self.checkpointing else "on"
        shard = f", 1/{self.world_size} shard" if self.strategy == "fsdp" else ""
        rows = [
            (f"parameters (fp32{shard})", self.parameters),
            ("  compute copies at the peak (gathered / autocast)", self.gathered),
            (f"gradients (fp32{shard}" + (", + DDP buckets" if self.strategy == "ddp" else "") + ")", self.gradients),
            (f"optimizer state ({self.optimizer}{shard})", self.optimizer_state),
            ("activations, no checkpointing", self.activations),
            ("activations, activation checkpointing", self.activations_checkpointed),
            (f"peak of a step, checkpointing {ck} (configured)", self.peak),
            (f"peak of a step, checkpointing {other}", self.peak_other),
        ]
        head = (f"memory plan: {self.model} ({self.num_parameters / 1e6:.0f}M parameters), {self.strategy} on "
                f"{self.world_size} device{'s' if self.world_size > 1 else ''}, {self.precision}, "
                f"optimizer {self.optimizer}\n"
                f"micro-batch {self.micro_batch} x (input {self.input_length}, target {self.target_length}) "
                "per device and micro-step")
        width = max(len(r[0]) for r in rows)
        lines = [head, ""] + [f"  {name:<{width}}  {nbytes / GB:>9.2f} GB" for name, nbytes in rows]
        verdict = "fits" if self.fits else "does NOT fit"
        lines += ["", f"  {verdict} in {self.memory / GB:.0f} GB per device (peak at {self.breakdown.get('at', '?')}; "
                  "add a few GB for the CUDA context and allocator slack)"]
        if not self.fits and self.peak_other <= self.memory:
            lines.append(f"  with model.gradient_checkpointing={str(not self.checkpointing).lower()} "
                         "it would fit")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ shapes
def step_lengths(cfg: Config) -> tuple[int, int]:
    """(encoder length, decoder length) of a training batch: span corruption's exact lengths in
    pre-training, the maximum (padded) lengths in fine-tuning."""
    if cfg.mode == "pt":
        from nanot5.data.span_corruption import compute_lengths

        _, target = compute_lengths(cfg.data.input_length, cfg.data.mlm_probability,
                                    cfg.data.mean_noise_span_length)
        return cfg.data.input_length, target
    return cfg.data.max_seq_len, cfg.data.max_target_len


def _meta_model(cfg: Config):
    """The configured T5 on the meta device: shapes without memory (an XL model in milliseconds)."""
    import torch

    from nanot5.model import T5
    from nanot5.build import model_config

    with torch.device("meta"):
        return T5(model_config(cfg))


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _linear_numel(module) -> int:
    """Elements of the matmul weights (what autocast casts) in module."""
    from torch import nn

    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def _saved_per_layer(mc, B: int, S: int, T: int, c: int, decoder: bool, norm_out: int) -> int:
    """Bytes one block's forward saves for backward (model.py's Block; c = compute dtype bytes).

    Per token, in the order of the code: each RMSNorm keeps its fp32 input (4C; `norm_out` more
    bytes per element where F.rms_norm is composite, see `_norm_out`) and the matmul after it
    its input (the norm's output, or its autocast copy: cC); self-attention keeps q, k, v
    (3I, views of the fused projection) and the output projection's input (I); the gated FFN keeps
    wi's output (2F: gate and up), act(gate) (F) and wo's input (F), ungated one F. Attention keeps
    its probabilities (B, H, T, S) in the compute dtype. Cross-attention adds its norm and q input
    (4C + cC), q and the o input (2I), k and v of the memory (2I per memory token) and, under
    autocast, each layer's own compute-dtype copy of the memory (the kv projection's input).
    RMSNorm's per-row statistic adds 4 bytes per token and norm.
    """
    C, I, H = mc.d_model, mc.num_heads * mc.d_kv, mc.num_heads
    ffn = 4 * mc.d_ff if mc.is_gated else mc.d_ff
    norm = (4 + norm_out + c) * C + 4  # per token: input, [normalized input,] matmul input, statistic
    if not decoder:
        per_token = 2 * norm + c * (4 * I + ffn)
        return B * S * per_token + c * B * H * S * S
    per_token = 3 * norm + c * (6 * I + ffn)
    per_memory_token = 2 * I * c + (c * C if c < 4 else 0)
    return B * T * per_token + c * B * H * T * (T + S) + B * S * per_memory_token


def _norm_out(device: str) -> int:
    """Bytes per element F.rms_norm keeps beyond its input: on the CPU it is composite (torch 2.13)
    and autograd keeps the fp32 normalized input for the weight's gradient; on CUDA torch's fused
    kernel (aten::_fused_rms_norm) keeps only the input and the per-row statistic."""
    return 4 if device == "cpu" else 0


def _block_transient(mc, B: int, Tq: int, Tk: int, c: int) -> int:
    """Largest temporaries inside one block's backward: the attention probabilities' gradient and
    the softmax backward's output (2 x (B, H, Tq, Tk)), or the FFN's hidden gradients, next to the
    fp32 gradient of the residual stream and of the norm input."""
    ffn = (3 if mc.is_gated else 1) * mc.d_ff
    return max(2 * c * B * mc.num_heads * Tq * Tk, c * B * Tq * ffn) + 2 * 4 * B * Tq * mc.d_model


def _adafactor_state(model, shards: int) -> tuple[int, int]:
    """(bytes of Adafactor's state on one device, elements of its largest local matrix), with
    dim 0 split in `shards` (row statistics sharded, column statistics replicated)."""
    blocks = {}
    for module in model.modules():
        if hasattr(module, "fused_row_blocks"):
            named = dict(module.named_parameters())
            blocks.update({id(named[n]): k for n, k in module.fused_row_blocks().items()})
    total = largest = 0
    for p in model.parameters():
        local = _shard(p, shards)
        if p.ndim >= 2:
            n, cols = blocks.get(id(p), 1), p.shape[-1]
            col_elems = (n if n > 1 else p.numel() // (p.shape[-2] * cols)) * cols
            total += 4 * (local // cols + col_elems)
            largest = max(largest, local // n)
        else:
            total += 4 * local
    return total, largest


def _shard(p, shards: int) -> int:
    """Elements of the largest dim-0 shard of p (torch.chunk rows: the first ranks round up)."""
    if p.ndim == 0:
        return 1
    return math.ceil(p.shape[0] / shards) * (p.numel() // p.shape[0])


# ------------------------------------------------------------------------------- plan
def memory_plan(cfg: Config, world_size: int = 1, strategy: str | None = None,
                memory_gb: float = 80.0, device: str = "cuda") -> MemoryPlan:
    """Estimate the per-device memory of training as `cfg` says on `world_size` devices.

    strategy: ddp or fsdp (default cfg.distributed.strategy); one device is always "single".
    device: cuda (what the plan is for) or cpu (where tests/test_plan.py measures it).
    """
    if world_size < 1:
        raise ConfigError(f"world_size must be >= 1, got {world_size}")
    strategy = "single" if world_size == 1 else (strategy or cfg.distributed.strategy)
    if strategy not in ("single", "ddp", "fsdp"):
        raise ConfigError(f"distributed.strategy={strategy!r}: use ddp or fsdp")
    per_step = cfg.optim.batch_size // cfg.optim.grad_acc
    if per_step % world_size:
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} / optim.grad_acc={cfg.optim.grad_acc} = "
                          f"{per_step} is not divisible by world_size={world_size}")
    B = per_step // world_size
    S, T = step_lengths(cfg)
    model = _meta_model(cfg)
    mc = model.config
    V, C = mc.vocab_size, mc.d_model
    fsdp = strategy == "fsdp"
    half = cfg.precision in _HALF_PRECISIONS
    c = 2 if half else 4  # bytes of the compute dtype
    casts = half and not fsdp  # autocast's copies of fp32 weights (FSDP2 gathers bf16 weights instead)
    W = world_size if fsdp else 1
    norm_out = _norm_out(device)
    N = _numel(model)
    local_params = sum(_shard(p, W) for p in model.parameters())
    block_params = [_numel(b) for b in list(model.encoder.blocks) + list(model.decoder.blocks)]
    root_params = N - sum(block_params)  # FSDP2's root group: embeddings, lm_head, biases, final norms

    # ---- optimizer state and its temporaries
    if cfg.optim.name == "adafactor":
        opt_state, largest = _adafactor_state(model, W)
        opt_transient = 4 * largest  # g^2 of one matrix, then g * rsqrt(C)
    else:  # AdamWScale, AdamW: two moments; the fused kernel (>= 64Ki elements) needs no temporaries
        opt_state = 2 * 4 * local_params
        opt_transient = 4 * sum(p.numel() for p in model.parameters() if p.numel() < (1 << 16))

    # ---- the backward pass, unit by unit, in the order it runs
    def units(checkpointing: bool) -> list[_Unit]:
        r = 2 if (fsdp and half) else 4  # the residual stream is bf16 when FSDP2 gathers bf16 weights
        head_params = (0 if mc.tie_word_embeddings else V * C) + C  # lm_head, decoder final norm
        out = [_Unit("loss", root=True, params=0, saved=4 * B * T * V,  # fp32 log-probs
                     transient=2 * 4 * B * T * V),  # the gradients of the log-probs and of the logits
               _Unit("lm_head", root=True, params=head_params,
                     saved=((4 + norm_out + c) * C + 4) * B * T,  # the final norm's, lm_head's input
                     transient=(4 + (c if half else 0)) * B * T * V,  # the logits' gradient [and its cast]
                     casts=c * V * C if casts else 0)]
        for stack, Tq, Tk in ((model.decoder, T, max(T, S)), (model.encoder, S, S)):
            decoder = stack is model.decoder
            for i in reversed(range(len(stack.blocks))):
                saved = _saved_per_layer(mc, B, S, T, c, decoder=decoder, norm_out=norm_out)
                transient = _block_transient(mc, B, Tq, Tk, c)
                if checkpointing:  # the block keeps its input and recomputes the rest in its backward
                    saved, transient = r * B * Tq * C, transient + saved
                out.append(_Unit(f"{'decoder' if decoder else 'encoder'} block {i}", saved=saved,
                                 params=_numel(stack.blocks[i]), transient=transient,
                                 casts=c * _linear_numel(stack.blocks[i]) if casts and not checkpointing else 0))
            if decoder:  # bias buckets (int64) and causal mask, the fp32 encoder output (which the kv
                # projections keep in fp32, and checkpointing as every block's input), the embedding
                # (whose gradient appears here); checkpointing also keeps the position bias
                out.append(_Unit("decoder inputs", root=True, transient=0,
                                 saved=9 * T * T + (4 * B * S * C if checkpointing or not half else 0)
                                 + (4 * mc.num_heads * T * T if checkpointing else 0),
                                 params=_numel(stack.rel_bias) + (0 if mc.tie_word_embeddings else V * C)))
                out.append(_Unit("encoder final norm", root=True, saved=((4 + norm_out) * C + 4) * B * S,
                                 params=C, transient=0))
        out.append(_Unit("encoder inputs", root=True, params=_numel(model.encoder.rel_bias), transient=0,
                         saved=8 * S * S + (4 * mc.num_heads * S * S if checkpointing else 0)))
        return out

    def walk(checkpointing: bool) -> tuple[int, dict]:
        us = units(checkpointing)
        persistent = 4 * local_params + opt_state + (4 * N if strategy == "ddp" else 0)  # + DDP's buckets
        gathered_root = c * root_params if fsdp else 0  # FSDP2 keeps the root gathered all along
        accumulating = cfg.optim.grad_acc > 1  # later micro-batches find every gradient allocated
        grads = 4 * local_params if accumulating else 0
        saved, unit_casts = sum(u.saved for u in us), sum(u.casts for u in us)
        all_casts = sum(u.casts for u in units(False))  # autocast caches every cast during the forward
        logits = c * B * T * V + (4 * B * T * V if half else 0)  # the logits, and their fp32 copy
        candidates = {"the end of the forward": persistent + gathered_root + grads + saved + all_casts + logits}
        root_grads = 0  # FSDP2 reduce-scatters the root's gradients at the end of the backward
        for k, u in enumerate(us):
            alive = persistent + gathered_root + saved + unit_casts + grads + root_grads + u.transient
            if not fsdp:
                alive += 4 * u.params  # its gradients (a temporary, then added, when accumulating)
            elif u.root:
                root_grads += c * u.params
                alive += c * u.params
            else:  # its and the prefetched block's gathered weights; unsharded grads, fp32 reduce-scatter input
                following = next((x.params for x in us[k + 1:] if not x.root), 0)
                alive += c * (u.params + following) + (c + 4) * u.params
            candidates[f"the backward of the {u.name}"] = alive
            saved, unit_casts = saved - u.saved, unit_casts - u.casts
            if not accumulating:
                grads += 4 * u.params if not fsdp else (4 * math.ceil(u.params / W) if not u.root else 0)
        candidates["the optimizer step"] = persistent + 4 * local_params + opt_transient
        at = max(candidates, key=candidates.get)
        return candidates[at], {"at": at, "casts": all_casts, "candidates": candidates}

    ckpt = cfg.model.gradient_checkpointing
    peak, info = walk(ckpt)
    peak_other, _ = walk(not ckpt)
    return MemoryPlan(
        model=cfg.model.name, num_parameters=N, world_size=world_size, strategy=strategy,
        precision=cfg.precision, optimizer=cfg.optim.name, micro_batch=B, input_length=S, target_length=T,
        checkpointing=ckpt, parameters=4 * local_params,
        gathered=c * (root_params + 2 * max(block_params)) if fsdp else info["casts"],
        gradients=4 * local_params + (4 * N if strategy == "ddp" else 0), optimizer_state=opt_state,
        activations=sum(u.saved for u in units(False)), activations_checkpointed=sum(u.saved for u in units(True)),
        peak=peak, peak_other=peak_other, memory=int(memory_gb * GB), breakdown=info)


# ------------------------------------------------------------------------------- CLI
def plan_main(argv: list[str]) -> int:
    """`nanot5 plan [preset=NAME] [distributed.strategy=ddp|fsdp] [world_size=N] [memory_gb=80] [key=value ...]`

    Prints the estimated memory per device of the configured training run (default preset:
    nanot5-base, one device, 80 GB)."""
    if any(a in ("-h", "--help") for a in argv):
        print("usage: " + plan_main.__doc__.strip().strip("`").replace("`\n", "\n", 1))
        return 0
    world_size, memory_gb, rest = 1, 80.0, []
    for arg in argv:
        key, _, value = arg.partition("=")
        try:
            if key == "world_size":
                world_size = int(value)
            elif key == "memory_gb":
                memory_gb = float(value)
            else:
                rest.append(arg)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    cfg = load_config(rest, default_preset="nanot5-base")
    plan = memory_plan(cfg, world_size=world_size, memory_gb=memory_gb)
    print(plan.table())
    return 0 if plan.fits else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(plan_main(sys.argv[1:]))
