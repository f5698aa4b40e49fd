"""Our T5 against `transformers` (the oracle): logits, loss, gradients, greedy generation, HF round-trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import T5Config as HFConfig  # noqa: E402
from transformers import T5ForConditionalGeneration  # noqa: E402

from nanot5 import T5, T5Config  # noqa: E402
from nanot5.hf import config_from_hf, from_hf_state_dict, name_table  # noqa: E402
from nanot5.model import flops_per_step, relative_position_bucket  # noqa: E402

VOCAB = 512
VARIANTS = {
    # T5 v1.1 / Flan-T5 / nanoT5: gated-GELU, untied head, no output scaling
    "v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    # original T5: ReLU, tied embeddings with d_model**-0.5 output scaling
    "original": dict(feed_forward_proj="relu", tie_word_embeddings=True),
}


def hf_model(variant: str, seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = HFConfig(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2,
                   num_heads=4, relative_attention_num_buckets=16, relative_attention_max_distance=40,
                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                   **VARIANTS[variant])
    model = T5ForConditionalGeneration(cfg).eval()
    if not VARIANTS[variant]["tie_word_embeddings"]:
        # transformers >= 5 shares storage between lm_head and the embedding at construction even for
        # v1.1 configs; give the head its own weights, drawn with HF's init for untied heads (std 1)
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
    return model


def ours_from(hf: T5ForConditionalGeneration) -> T5:
    cfg = config_from_hf(hf.config.to_dict())
    model = T5(cfg).eval()
    model.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    return model


def padded_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (3, 45), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    mask[2, 7:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = torch.randint(2, VOCAB, (3, 13), generator=g)
    labels[0, 9:] = -100
    return ids, mask, labels


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_loss_and_gradients_match_transformers(variant):
    hf = hf_model(variant)
    ours = ours_from(hf)
    ids, mask, labels = padded_batch()
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
    out = ours(ids, attention_mask=mask, labels=labels)
    assert (out.logits - ref.logits).abs().max() / ref.logits.abs().max() <= 1e-5
    assert abs(out.loss.item() - ref.loss.item()) / ref.loss.item() <= 1e-5
    ref.loss.backward()
    out.loss.backward()
    hf_params = dict(hf.named_parameters(remove_duplicate=False))
    ours_params = dict(ours.named_parameters())
    for name, hf_names in name_table(ours.config):
        grads = [hf_params[h].grad for h in hf_names]
        assert all(g is not None for g in grads), name
        assert rel(ours_params[name].grad, torch.cat(grads)) <= 1e-4, name


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decoder_inputs_and_mask_match_transformers(variant):
    hf = hf_model(variant)
    ours = ours_from(hf)
    ids, mask, labels = padded_batch(seed=5)
    dec_in = ours.shift_right(labels)
    dec_mask = (labels != -100).long()
    ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_in, decoder_attention_mask=dec_mask)
    out = ours(ids, attention_mask=mask, decoder_input_ids=dec_in, decoder_attention_mask=dec_mask)
    assert (out.logits - ref.logits).abs().max() / ref.logits.abs().max() <= 1e-5
    assert torch.equal(dec_in, hf._shift_right(labels))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generate_matches_transformers(variant):
    hf = hf_model(variant)
    ours = ours_from(hf)
    ids, mask, _ = padded_batch(seed=2)
    ref = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=32,
                      min_new_tokens=32, eos_token_id=None)[:, 1:]  # drop the start token
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=32, eos_token_id=-1)
    assert got.shape == (3, 32)
    assert torch.equal(got, ref)


def test_generate_stops_per_row_at_eos_and_pads():
    hf = hf_model("v1_1")
    ours = ours_from(hf)
    ids, mask, _ = padded_batch(seed=2)
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=32, eos_token_id=-1)
    eos = int(free[0, 3])  # a token row 0 emits early: treat it as EOS
    ref = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=32,
                      eos_token_id=eos, pad_token_id=0)[:, 1:]
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=32, eos_token_id=eos)
    assert torch.equal(got, ref)
    first = int((got[0] == eos).nonzero()[0])
    assert (got[0, first + 1:] == 0).all()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_hf_loads_in_transformers_with_identical_logits(variant, tmp_path):
    torch.manual_seed(3)
    ours = T5(T5Config.from_name("t5-v1_1-tiny", vocab_size=VOCAB, **VARIANTS[variant])).eval()
    ours.save_hf(tmp_path)
    hf, info = T5ForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, mask, labels = padded_batch()
    ref = hf.eval()(input_ids=ids, attention_mask=mask, labels=labels).logits
    # identical up to float rounding (our q/k/v and wi_0/wi_1 matmuls are fused)
    assert (ours(ids, attention_mask=mask, labels=labels).logits - ref).abs().max() / ref.abs().max() <= 1e-6
    back = T5.from_hf(tmp_path).eval()
    assert back.config == ours.config
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_from_hf_loads_directories_saved_by_transformers(variant, tmp_path):
    hf = hf_model(variant)
    hf.save_pretrained(tmp_path)
    ours = T5.from_hf(tmp_path).eval()
    assert ours.config.tie_word_embeddings == VARIANTS[variant]["tie_word_embeddings"]
    ids, mask, labels = padded_batch()
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels).logits
    assert (ours(ids, attention_mask=mask, labels=labels).logits - ref).abs().max() / ref.abs().max() <= 1e-5


def test_from_hf_reads_pytorch_bin_and_untied_head_stored_once(tmp_path):
    """An untied v1.1 directory whose head was saved sharing storage with the table (only shared.weight)."""
    hf = hf_model("v1_1")
    hf.lm_head.weight = hf.shared.weight  # tied in memory, as transformers >= 5 builds it
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in state
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours = T5.from_hf(tmp_path)
    assert not ours.config.tie_word_embeddings
    assert torch.equal(ours.lm_head.weight, state["shared.weight"])


def test_bad_inputs_give_clear_errors(tmp_path):
    hf_model("v1_1").config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model weights"):
        T5.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": 10}))
    with pytest.raises(KeyError, match="config.json: missing required key 'd_model'"):
        T5.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture.*bert"):
        T5Config.from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T5.from_hf(tmp_path / "nope")

    hf = hf_model("v1_1")
    hf.save_pretrained(tmp_path / "m")
    state = load_file(tmp_path / "m" / "model.safetensors")
    del state["decoder.block.1.layer.2.DenseReluDense.wo.weight"]
    save_file(state, tmp_path / "m" / "model.safetensors")
    with pytest.raises(KeyError, match=r"decoder\.block\.1\.layer\.2\.DenseReluDense\.wo\.weight"):
        T5.from_hf(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors: cannot read weights"):
        T5.from_hf(tmp_path / "m")
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="gated-tanh")
    with pytest.raises(ValueError, match="unknown model name"):
        T5Config.from_name("t5-v1_1-giant")


def test_relative_position_bucket_matches_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel_pos = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        ref = T5Attention._relative_position_bucket(rel_pos, bidirectional=bidirectional,
                                                     num_buckets=32, max_distance=128)
        assert torch.equal(relative_position_bucket(rel_pos, bidirectional, 32, 128), ref)


def test_base_preset_has_248m_parameters_and_hf_init_scales():
    with torch.device("meta"):
        model = T5(T5Config.from_name("t5-v1_1-base"))
    assert abs(model.num_parameters() - 247_577_856) < 1e6  # google/t5-v1_1-base
    torch.manual_seed(0)
    small = T5(T5Config.from_name("t5-v1_1-small"))
    d = small.config.d_model
    assert small.lm_head.weight.std().item() == pytest.approx(d ** -0.5, rel=0.02)
    assert small.shared.weight.std().item() == pytest.approx(1.0, rel=0.02)
    qkv = small.encoder.blocks[0].attn.qkv.weight
    inner = small.config.num_heads * small.config.d_kv
    assert qkv[:inner].std().item() == pytest.approx((d * small.config.d_kv) ** -0.5, rel=0.05)
    assert qkv[inner:].std().item() == pytest.approx(d ** -0.5, rel=0.05)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    cfg = T5Config.from_name("t5-v1_1-tiny", vocab_size=VOCAB)
    a = T5(cfg).train()
    b = T5(T5Config(**{**cfg.to_dict(), "gradient_checkpointing": True})).train()
    b.load_state_dict(a.state_dict())
    ids, mask, labels = padded_batch()
    for m in (a, b):
        m(ids, attention_mask=mask, labels=labels).loss.backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name


def test_flops_count_matches_torch_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = T5Config.from_name("t5-v1_1-tiny", vocab_size=VOCAB)
    model = T5(cfg)
    ids, labels = torch.randint(2, VOCAB, (2, 40)), torch.randint(2, VOCAB, (2, 9))
    # the math backend runs attention as bmm, which the counter knows (it skips the CPU flash kernel)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids, labels=labels).loss.backward()
    assert flops_per_step(cfg, 2, 40, 9) == counter.get_total_flops()


def test_real_t5_vocabulary_fits_the_embedding(t5_tokenizer_dir):
    tok = transformers.AutoTokenizer.from_pretrained(str(t5_tokenizer_dir))
    assert len(tok) == 32100
    assert tok.convert_tokens_to_ids("<extra_id_0>") == 32099
    assert len(tok) <= T5Config.from_name("t5-v1_1-base").vocab_size == 32128
    ids = tok("Studies have shown that owning a dog is good for you", return_tensors="pt").input_ids
    assert ids[0, -1].item() == 1 and ids.max().item() < 32128
