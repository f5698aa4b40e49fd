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


# ------------------------------------------------------------- checkpoint formats
TINY_HF = dict(d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4,
               relative_attention_num_buckets=16, relative_attention_max_distance=40, dropout_rate=0.0,
               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def _untie(model, seed: int = 7) -> None:
    """Give an HF model (tied at construction by transformers >= 5) its own lm_head, drawn like HF's
    untied init (std 1)."""
    g = torch.Generator().manual_seed(seed)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.shared.weight.shape, generator=g))


def _write_checkpoint(fmt: str, out) -> None:
    """A tiny random checkpoint directory in one of the formats users have on disk."""
    from transformers import MT5Config, MT5ForConditionalGeneration

    torch.manual_seed(11)
    if fmt == "t5-original":  # tied, scaled: transformers writes no lm_head.weight
        T5ForConditionalGeneration(HFConfig(vocab_size=VOCAB, feed_forward_proj="relu", **TINY_HF)).save_pretrained(out)
    elif fmt in ("t5-v1_1", "byt5"):  # untied, unscaled; byT5: byte vocabulary of 384 (t5 model_type)
        vocab = 384 if fmt == "byt5" else VOCAB
        hf = T5ForConditionalGeneration(HFConfig(vocab_size=vocab, feed_forward_proj="gated-gelu",
                                                 tie_word_embeddings=False, **TINY_HF))
        _untie(hf)
        hf.save_pretrained(out)
    elif fmt == "mt5-transformers5":  # tie_word_embeddings true, no lm_head.weight, never scaled
        MT5ForConditionalGeneration(MT5Config(vocab_size=VOCAB, **TINY_HF)).save_pretrained(out)
    elif fmt == "mt5-hub":  # google/mt5-*: tie_word_embeddings false and an untied lm_head.weight
        hf = MT5ForConditionalGeneration(MT5Config(vocab_size=VOCAB, **TINY_HF))
        state = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
        state["lm_head.weight"] = torch.randn_like(state["shared.weight"])
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
        config = dict(architectures=["MT5ForConditionalGeneration"], model_type="mt5", vocab_size=VOCAB,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, initializer_factor=1.0,
                      is_encoder_decoder=True, layer_norm_epsilon=1e-6, output_past=True,
                      tokenizer_class="T5Tokenizer", transformers_version="4.10.0.dev0", use_cache=True,
                      **TINY_HF)
        (out / "config.json").write_text(json.dumps(config, indent=2))
    else:
        raise ValueError(fmt)


# format -> (tied, scaled) as transformers 5 runs it
FORMATS = {"t5-original": (True, True), "t5-v1_1": (False, False), "mt5-transformers5": (True, False),
           "mt5-hub": (False, False), "byt5": (False, False)}


def _logits_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_t5_family_checkpoint_loads_like_transformers(fmt, tmp_path):
    """Parity with transformers' own model on each directory, then save_hf -> transformers -> from_hf."""
    _write_checkpoint(fmt, tmp_path / "src")
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "src").eval()
    tied, scaled = FORMATS[fmt]
    assert (hf.lm_head.weight is hf.shared.weight) == tied  # the oracle runs the semantics we expect
    ours = T5.from_hf(tmp_path / "src").eval()
    assert (ours.config.tie_word_embeddings, ours.config.scale_decoder_outputs) == (tied, scaled)
    ids, mask, labels = padded_batch()
    ids, labels = ids % hf.config.vocab_size, labels.where(labels < 0, labels % hf.config.vocab_size)
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels).logits
    got = ours(ids, attention_mask=mask, labels=labels).logits
    assert _logits_rel(got, ref) <= 1e-5

    ours.save_hf(tmp_path / "ours")
    hf2, info = T5ForConditionalGeneration.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (hf2.lm_head.weight is hf2.shared.weight) == tied
    assert _logits_rel(hf2.eval()(input_ids=ids, attention_mask=mask, labels=labels).logits, got) <= 1e-5
    hf2.save_pretrained(tmp_path / "back")
    back = T5.from_hf(tmp_path / "back").eval()
    assert back.config == ours.config
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_scaling_follows_model_type_not_the_tie_flag():
    """transformers 5: t5 configs scale unless tie_word_embeddings is false (or scale_decoder_outputs
    says otherwise); mt5 never scales."""
    base = dict(TINY_HF, vocab_size=VOCAB, feed_forward_proj="gated-gelu")
    for extra, expected in [({"model_type": "t5"}, (True, True)),  # original T5 hub config: no tie key
                            ({"model_type": "t5", "tie_word_embeddings": False}, (False, False)),
                            ({"model_type": "t5", "tie_word_embeddings": True,
                              "scale_decoder_outputs": False}, (False, False)),
                            ({"model_type": "mt5", "tie_word_embeddings": True}, (True, False)),
                            ({"model_type": "mt5", "tie_word_embeddings": False}, (False, False))]:
        cfg = config_from_hf({**base, **extra})
        assert (cfg.tie_word_embeddings, cfg.scale_decoder_outputs) == expected, extra
        if extra["model_type"] == "t5":  # transformers' own reading of the same dict
            assert HFConfig(**{k: v for k, v in {**base, **extra}.items() if k != "model_type"}
                            ).scale_decoder_outputs == expected[1]


def test_umt5_is_refused_with_a_clear_error(tmp_path):
    from transformers import UMT5Config, UMT5ForConditionalGeneration

    UMT5ForConditionalGeneration(UMT5Config(vocab_size=VOCAB, **TINY_HF)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="UMT5 is not supported: it learns a relative position bias in every layer"):
        T5.from_hf(tmp_path)
    with pytest.raises(ValueError, match="UMT5 is not supported"):
        T5Config.from_hf(tmp_path)


def test_from_hf_reads_pytorch_bin_and_follows_transformers_tying(tmp_path):
    """A v1.1 model whose head shares the table (transformers >= 5 builds it so) is saved without
    lm_head.weight; transformers loads that tied and unscaled, and so do we (from a .bin here)."""
    hf = hf_model("v1_1")
    hf.lm_head.weight = hf.shared.weight
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in state
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours = T5.from_hf(tmp_path).eval()
    assert ours.config.tie_word_embeddings and not ours.config.scale_decoder_outputs
    ids, mask, labels = padded_batch()
    ref = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()(input_ids=ids, attention_mask=mask,
                                                                      labels=labels).logits
    assert _logits_rel(ours(ids, attention_mask=mask, labels=labels).logits, ref) <= 1e-5


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


def test_lm_head_init_hf_draws_std_one():
    """lm_head_init=hf: std 1.0 as HF's _init_weights and nanoT5; default: d_model**-0.5 (t5-v1_1-small)."""
    for init, expected in (("hf", 1.0), ("scaled", 512 ** -0.5)):
        with torch.device("meta"):  # only the head gets real memory: init_weights draws it
            model = T5(T5Config.from_name("t5-v1_1-small", lm_head_init=init))
        model.lm_head.to_empty(device="cpu")
        torch.manual_seed(0)
        model.init_weights()
        assert model.lm_head.weight.std().item() == pytest.approx(expected, rel=0.02), init
    with pytest.raises(ValueError, match="lm_head_init"):
        T5Config(lm_head_init="xavier")
    with pytest.raises(ValueError, match="attention"):
        T5Config(attention="fast")


# ------------------------------------------------------------------- chunked loss
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chunked_loss_equals_plain_loss_and_gradients(variant, monkeypatch):
    import nanot5.model as model_module

    monkeypatch.setattr(model_module, "LOSS_CHUNK_BYTES", 4 * VOCAB * 5)  # 5 target positions per chunk
    torch.manual_seed(0)
    cfg = T5Config.from_name("t5-v1_1-tiny", vocab_size=VOCAB, **VARIANTS[variant])
    plain, chunked = T5(cfg), T5(cfg)
    chunked.load_state_dict(plain.state_dict())
    ids, mask, labels = padded_batch()
    ref = plain(ids, attention_mask=mask, labels=labels)
    out = chunked(ids, attention_mask=mask, labels=labels, return_logits=False)
    assert out.logits is None and ref.logits.shape == (3, 13, VOCAB)
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * ref.loss.item()
    (2.0 * ref.loss).backward()  # an upstream gradient other than 1 reaches both paths alike
    (2.0 * out.loss).backward()
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters()):
        assert rel(q.grad, p.grad) <= 1e-5, name
    with torch.no_grad():  # evaluation: the same loss without any gradient work
        assert abs(chunked(ids, attention_mask=mask, labels=labels, return_logits=False).loss.item()
                   - ref.loss.item()) <= 1e-5 * ref.loss.item()


def test_chunked_loss_under_bf16_autocast_matches_plain():
    torch.manual_seed(0)
    model = T5(T5Config.from_name("t5-v1_1-tiny", vocab_size=VOCAB))
    ids, mask, labels = padded_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(ids, attention_mask=mask, labels=labels).loss
        out = model(ids, attention_mask=mask, labels=labels, return_logits=False).loss
    assert abs(out.item() - ref.item()) <= 1e-3 * ref.item()


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
