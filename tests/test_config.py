"""Config: presets equal nanoT5's recipes, overrides are typed, mistakes name the key."""

from __future__ import annotations

import pytest

from nanot5.config import (
    ConfigError,
    config_from_dict,
    load_config,
    preset_names,
    read_config,
)


def test_nanot5_base_preset_is_nanot5_default():
    cfg = load_config(["preset=nanot5-base"])
    o = cfg.optim
    assert (o.name, o.base_lr, o.batch_size, o.grad_acc, o.total_steps, o.warmup_steps) == \
        ("adamwscale", 2e-2, 128, 1, 65536, 10000)
    assert (o.lr_scheduler, o.final_cosine, o.grad_clip, o.weight_decay) == ("cosine", 1e-5, 1.0, 0.0)
    assert (cfg.model.name, cfg.data.source, cfg.data.input_length, cfg.precision) == \
        ("t5-v1_1-base", "c4", 512, "bf16")
    assert (cfg.data.mlm_probability, cfg.data.mean_noise_span_length) == (0.15, 3.0)


@pytest.mark.parametrize("hours,steps,warmup", [(4, 13333, 1666), (8, 26666, 3332), (12, 39999, 5000),
                                                (16, 53332, 6666), (20, 66665, 8332), (24, 79998, 10000)])
def test_time_budget_presets(hours, steps, warmup):
    o = load_config([f"preset=pt_{hours}h"]).optim
    assert (o.batch_size, o.grad_acc, o.total_steps, o.warmup_steps) == (256, 2, steps, warmup)
    assert o.name == "adamwscale"  # inherited from nanot5-base


def test_sni_preset_is_nanot5_finetuning():
    cfg = load_config(["preset=sni"])
    o = cfg.optim
    assert (cfg.mode, o.name, o.base_lr, o.lr_scheduler, o.batch_size, o.epochs, o.grad_clip, cfg.precision) == \
        ("ft", "adamw", 5e-5, "constant", 8, 2, 0.0, "fp32")


def test_overrides_are_typed_and_applied_after_preset_and_file(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text("optim:\n  base_lr: 0.01\n  total_steps: 100\nmodel:\n  overwrite:\n    num_layers: 3\n")
    cfg = load_config(["preset=nanot5-base", f"config={f}", "optim.total_steps=50", "optim.warmup_steps=5", "model.overwrite.d_ff=64",
                       "precision=no", "model.compile=false"])
    assert cfg.optim.base_lr == 0.01 and cfg.optim.total_steps == 50
    assert cfg.model.overwrite == {"dropout_rate": 0.0, "num_layers": 3, "d_ff": 64}
    assert cfg.precision == "fp32" and cfg.model.compile is False
    assert isinstance(load_config(["optim.base_lr=1"]).optim.base_lr, float)


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.nmae'.*optim\.name"):
        load_config(["optim.nmae=adamw"])
    with pytest.raises(ConfigError, match=r"model\.overwrite\.num_layrs.*model\.overwrite\.num_layers"):
        load_config(["model.overwrite.num_layrs=2"])


def test_bad_values_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="optim.batch_size=7 is not divisible by optim.grad_acc=2"):
        load_config(["optim.batch_size=7", "optim.grad_acc=2"])
    with pytest.raises(ConfigError, match="optim.base_lr: expected float"):
        load_config(["optim.base_lr=fast"])
    with pytest.raises(ConfigError, match="optim.total_steps: expected int"):
        load_config(["optim.total_steps=1.5"])
    with pytest.raises(ConfigError, match="optim.name='sgd' is not valid"):
        load_config(["optim.name=sgd"])
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config(["preset=nope"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(["optim.base_lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config([f"config={bad}"])


def test_config_round_trips_through_yaml_and_is_frozen(tmp_path):
    cfg = load_config(["preset=pt_8h", "seed=3"])
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    assert read_config(tmp_path / "config.yaml") == cfg == config_from_dict(cfg.to_dict())
    with pytest.raises(Exception):
        cfg.optim.base_lr = 1.0  # type: ignore[misc]


def test_every_preset_loads():
    for name in preset_names():
        load_config([f"preset={name}"])
    assert {"demo", "nanot5-base", "sni", "pt_16h"} <= set(preset_names())
