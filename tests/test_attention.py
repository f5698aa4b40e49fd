"""Attention implementations and packing, against the eager reference (itself tested against
transformers in test_model.py): flex and sdpa logits/gradients, the CPU fallback, and packed rows
against each example run alone."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

from bench.gpu import PACKED_EXAMPLES as EXAMPLES  # (input, target) lengths; rows: 0 = examples 0, 1; 1 = 2, 3
from bench.gpu import PACKED_ROWS as ROWS
from bench.gpu import packed_batch as build_packed_batch
from nanot5 import T5, T5Config
from nanot5.attention import choose_attention

VOCAB = 512
CUDA = torch.cuda.is_available()


def tiny_config(**overrides) -> T5Config:
    # HF's test shapes (test_model.py): d_model 64, 4 heads of 16, 16 buckets, max distance 40
    return T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=16, relative_attention_max_distance=40,
                    dropout_rate=0.0, **overrides)


def with_attention(model: T5, impl: str) -> T5:
    """A copy of `model` (same weights) that runs attention with `impl`."""
    other = T5(dataclasses.replace(model.config, attention=impl)).to(next(model.parameters()).device)
    other.load_state_dict(model.state_dict())
    return other.train(model.training)


def padded_batch(seed: int = 1, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (3, 45), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    mask[2, 7:] = 0
    labels = torch.randint(2, VOCAB, (3, 13), generator=g)
    labels[0, 9:] = -100
    labels[2, 4:] = -100
    batch = dict(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask, labels=labels,
                 decoder_attention_mask=(labels != -100).long())
    return {k: v.to(device) for k, v in batch.items()}


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def rel_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- choice
def test_choose_attention_per_device_and_fallbacks():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_attention("auto", cuda, needs_grad=True, dropout=False) == "flex"
    assert choose_attention("auto", cuda, needs_grad=True, dropout=True) == "eager"
    assert choose_attention("auto", cpu, needs_grad=True, dropout=False) == "eager"
    assert choose_attention("auto", cpu, needs_grad=False, dropout=False) == "sdpa"
    assert choose_attention("sdpa", cpu, needs_grad=True, dropout=True) == "sdpa"
    assert choose_attention("flex", cpu, needs_grad=False, dropout=False) == "flex"
    assert choose_attention("flex", cuda, needs_grad=True, dropout=False) == "flex"
    with pytest.warns(UserWarning, match="no backward on the CPU"):
        assert choose_attention("flex", cpu, needs_grad=True, dropout=False) == "eager"
    with pytest.warns(UserWarning, match="attention dropout"):
        assert choose_attention("flex", cuda, needs_grad=True, dropout=True) == "eager"


def test_cpu_training_forward_with_flex_falls_back_to_eager():
    """A CPU forward that needs gradients cannot run flex: eager runs instead (no traceback) and
    warns once per process."""
    import nanot5.attention as attention

    attention._warned.discard("flex-cpu-grad")
    torch.manual_seed(0)
    eager = T5(tiny_config()).train()
    flex = with_attention(eager, "flex")
    batch = padded_batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            flex.zero_grad()
            flex(**batch).loss.backward()
    assert sum("no backward on the CPU" in str(w.message) for w in caught) == 1
    eager(**batch).loss.backward()
    for (name, p), q in zip(eager.named_parameters(), flex.parameters()):
        assert torch.equal(p.grad, q.grad), name


# ----------------------------------------------------------------------------- sdpa
def test_sdpa_matches_eager_logits_and_gradients():
    torch.manual_seed(0)
    eager = T5(tiny_config()).train()
    sdpa = with_attention(eager, "sdpa")
    batch = padded_batch()
    ref, out = eager(**batch), sdpa(**batch)
    assert rel_max(out.logits, ref.logits) <= 1e-5
    ref.loss.backward()
    out.loss.backward()
    for (name, p), q in zip(eager.named_parameters(), sdpa.parameters()):
        assert rel_norm(q.grad, p.grad) <= 1e-5, name


# ----------------------------------------------------------------------------- flex
def _flex_vs_eager_forward(eager: T5, device: str = "cpu"):
    eager = eager.eval()
    flex = with_attention(eager, "flex").eval()
    batch = padded_batch(device=device)
    with torch.no_grad():
        # encoder: bidirectional with padding (compared on every position: no row is fully masked)
        h_ref = eager.encode(batch["input_ids"], batch["attention_mask"])
        assert rel_max(flex.encode(batch["input_ids"], batch["attention_mask"]), h_ref) <= 1e-5
        # decoder: causal + padding, cross-attention to the padded encoder
        ref, out = eager(**batch), flex(**batch)
        assert rel_max(out.logits, ref.logits) <= 1e-5
        assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * ref.loss.item()
    return eager, flex, batch


@pytest.mark.slow  # compiles three flex kernels on the CPU (about half a minute)
def test_flex_matches_eager_on_cpu_random_init_and_from_hf(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    eager, flex, batch = _flex_vs_eager_forward(T5(tiny_config()))
    # generation runs the encoder with flex (no gradients) and its decoder steps eagerly
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert torch.equal(flex.generate(ids, mask, max_new_tokens=8, eos_token_id=-1),
                       eager.generate(ids, mask, max_new_tokens=8, eos_token_id=-1))

    from nanot5.hf import config_to_hf
    hf_cfg = {k: v for k, v in config_to_hf(tiny_config()).items() if k not in ("architectures", "model_type")}
    torch.manual_seed(1)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_cfg))
    hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.shared.weight))
    hf.save_pretrained(tmp_path)
    _flex_vs_eager_forward(T5.from_hf(tmp_path))  # same shapes: the compiled kernels are reused


@pytest.mark.skipif(not CUDA, reason="FlexAttention has no backward on the CPU")
@pytest.mark.parametrize("packed", [False, True])
def test_flex_gradients_match_eager_on_cuda(packed):
    torch.manual_seed(0)
    eager = T5(tiny_config()).cuda().train()
    flex = with_attention(eager, "flex")
    batch = packed_batch(device="cuda")[0] if packed else padded_batch(device="cuda")
    ref, out = eager(**batch), flex(**batch)
    assert rel_max(out.logits, ref.logits) <= 1e-5
    ref.loss.backward()
    out.loss.backward()
    assert flex.encoder.rel_bias.weight.grad.abs().sum() > 0  # the bias table learns through flex
    for (name, p), q in zip(eager.named_parameters(), flex.parameters()):
        assert rel_norm(q.grad, p.grad) <= 1e-4, name


# ----------------------------------------------------------------------------- packing
def packed_batch(seed: int = 3, device: str = "cpu"):
    """Examples alone (unpadded), and packed by hand into 2 padded rows with segment ids: the batch
    bench/gpu.py's device checks build, at this file's tiny vocabulary."""
    return build_packed_batch(tiny_config(), 1, device, seed)


def per_example_losses(model: T5, batch: dict) -> list[torch.Tensor]:
    """Summed token cross-entropy of each packed example, in EXAMPLES order."""
    logits = model(**batch).logits
    tok = F.cross_entropy(logits.float().transpose(1, 2), batch["labels"], ignore_index=-100, reduction="none")
    out = {}
    for r, row in enumerate(ROWS):
        for k, j in enumerate(row, start=1):
            out[j] = tok[r][batch["decoder_segment_ids"][r] == k].sum()
    return [out[j] for j in range(len(EXAMPLES))]


def alone_losses(model: T5, examples) -> list[torch.Tensor]:
    return [F.cross_entropy(model(x[None], labels=y[None]).logits[0].float(), y, reduction="sum")
            for x, y in examples]


def test_shift_right_restarts_per_segment():
    model = T5(tiny_config())
    batch, examples = packed_batch()
    shifted = model.shift_right(batch["labels"], batch["decoder_segment_ids"])
    for r, row in enumerate(ROWS):
        expected = torch.cat([model.shift_right(examples[j][1][None])[0] for j in row])
        assert torch.equal(shifted[r, :len(expected)], expected)
        assert (shifted[r, len(expected):] == model.config.pad_token_id).all()


def test_packed_rows_equal_examples_alone():
    """Per-example losses and the gradients of their sum: packed (eager) == each example alone,
    unpadded; the mean loss over target tokens is the same as without packing."""
    torch.manual_seed(0)
    model = T5(tiny_config(feed_forward_proj="relu", tie_word_embeddings=True))  # scaled, tied head
    batch, examples = packed_batch()
    packed = per_example_losses(model, batch)
    sum(packed).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone = alone_losses(model, examples)
    sum(alone).backward()
    for j, (a, b) in enumerate(zip(packed, alone)):
        assert abs(a.item() - b.item()) <= 1e-5 * b.item(), j
    for name, p in model.named_parameters():
        assert rel_norm(grads[name], p.grad) <= 1e-5, name
    n_tokens = sum(t for _, t in EXAMPLES)
    with torch.no_grad():
        assert abs(model(**batch).loss.item() - sum(alone).item() / n_tokens) <= 1e-5 * model(**batch).loss.item()
        chunked = model(**batch, return_logits=False).loss  # packing composes with the chunked loss
        assert abs(chunked.item() - sum(alone).item() / n_tokens) <= 1e-5 * chunked.item()


def test_packing_needs_both_segment_ids():
    model = T5(tiny_config())
    batch, _ = packed_batch()
    del batch["decoder_segment_ids"]
    with pytest.raises(ValueError, match="encoder_segment_ids and decoder_segment_ids together"):
        model(**batch)


@pytest.mark.slow  # compiles the flex kernels of the packed shapes on the CPU
def test_packed_rows_with_flex_equal_examples_alone():
    torch.manual_seed(0)
    eager = T5(tiny_config()).eval()
    flex = with_attention(eager, "flex").eval()
    batch, examples = packed_batch()
    with torch.no_grad():
        packed = per_example_losses(flex, batch)
        alone = alone_losses(eager, examples)
    for j, (a, b) in enumerate(zip(packed, alone)):
        assert abs(a.item() - b.item()) <= 1e-5 * b.item(), j
