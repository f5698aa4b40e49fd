"""Optimizers and LR schedules against oracles: per-parameter reference implementations of the
formulas (written here, nanoT5/HF-shaped, with their host syncs), `torch.optim.AdamW`,
`transformers.Adafactor`, and nanoT5's torch-scheduler compositions."""

from __future__ import annotations

import copy
import io
import logging
import math
import warnings

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from nanot5.hf import name_table
from nanot5.model import T5, RMSNorm, T5Config
from nanot5.optim import (
    OPTIMIZERS,
    Adafactor,
    AdamWScale,
    build_optimizer,
    check_param_groups,
    lr_schedule,
    param_groups,
)

STEPS = 100


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors gain nothing from threads, and on a busy machine every parallel region (the CPU
    # fused kernel opens one per call) can stall for milliseconds. Results do not depend on it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- fixtures
class Toy(nn.Module):
    """Matrices (one fused from 3 row blocks), a 3-D tensor, vectors, a bias and a scalar."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.proj = nn.Linear(5, 6, dtype=dtype)  # (6, 5) matrix + bias
        self.fused = nn.Parameter(torch.randn(3 * 4, 5, dtype=dtype) * 0.3)  # 3 blocks of (4, 5)
        self.cube = nn.Parameter(torch.randn(2, 3, 4, dtype=dtype))
        self.norm = RMSNorm(6).to(dtype)
        self.gain = nn.Parameter(torch.tensor(0.7, dtype=dtype))
        self.tiny = nn.Parameter(torch.randn(4, 3, dtype=dtype) * 1e-5)  # rms below the 1e-3 floor
        self.big = nn.Parameter(torch.randn(256, 257, dtype=dtype) * 0.1)  # AdamWScale's fused size
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)


def toy(dtype=torch.float32, seed=0) -> Toy:
    torch.manual_seed(seed)
    return Toy(dtype)


def grad_seq(params, steps=STEPS, seed=1, zero_rows=True):
    """Random gradients, with a scale that differs per step (the clip in Adafactor triggers) and,
    at the first step, a zero first row in each (where Adafactor's eps[0] keeps 0 * inf away)."""
    gen = torch.Generator().manual_seed(seed)
    grads = [[torch.randn(p.shape, generator=gen, dtype=p.dtype) * (0.5 + 2 * (t % 3)) for p in params]
             for t in range(steps)]
    for g in grads[0] if zero_rows else []:
        if g.ndim:
            g[0] = 0
    return grads


def lr_at(t):  # a changing lr, as a schedule feeds it
    return 1e-2 * (1.0 - 0.5 * t / STEPS)


def run(opt, params, grads, lrs=lr_at):
    for t, gs in enumerate(grads):
        for group in opt.param_groups:
            group["lr"] = lrs(t)
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


def rel_err(a, b):
    return max(((x.double() - y.double()).norm() / y.double().norm()).item() for x, y in zip(a, b))


def tol(dtype):
    return 1e-6 if dtype == torch.float32 else 1e-12


# ------------------------------------------------------------------------ references
def logical(tensors, blocks):
    """Split fused tensors into the separate matrices they hold (copies, as HF stores them)."""
    return [c.clone() for x, n in zip(tensors, blocks) for c in (x.chunk(n) if n > 1 else (x,))]


def ref_adamwscale(mats, grads, lrs, betas=(0.9, 0.999), eps=1e-6, wd=0.0, scale=True):
    """nanoT5's AdamWScale, one matrix at a time, with its `max(1e-3, rms)` read on the host."""
    b1, b2 = betas
    m = [torch.zeros_like(p) for p in mats]
    v = [torch.zeros_like(p) for p in mats]
    for t, gs in enumerate(grads, start=1):
        lr = lrs(t - 1)
        for p, g, m_, v_ in zip(mats, gs, m, v):
            m_.mul_(b1).add_(g, alpha=1 - b1)
            v_.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = v_.sqrt().add_(eps)
            step = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            if scale:
                step *= max(1e-3, (p.norm(2) / p.numel() ** 0.5).item())
            p.addcdiv_(m_, denom, value=-step)
            if wd > 0:
                p.add_(p, alpha=-lr * wd)
    return mats


def ref_adafactor(mats, grads, lrs, eps=(1e-30, 1e-3), clip=1.0, decay=-0.8, beta1=None, wd=0.0):
    """Adafactor as HF computes it (relative_step=False, scale_parameter=True), per matrix."""
    def rms(x):
        return (x.norm() / x.numel() ** 0.5).item()

    state = [{} for _ in mats]
    for t, gs in enumerate(grads, start=1):
        lr = lrs(t - 1)
        for p, g, st in zip(mats, gs, state):
            step = lr * max(eps[1], rms(p))
            b2t = 1 - t ** decay
            sq = g * g + eps[0]
            if p.ndim >= 2:
                row = st.setdefault("row", torch.zeros(p.shape[:-1], dtype=p.dtype))
                col = st.setdefault("col", torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=p.dtype))
                row.mul_(b2t).add_(sq.mean(-1), alpha=1 - b2t)
                col.mul_(b2t).add_(sq.mean(-2), alpha=1 - b2t)
                r = (row / row.mean(-1, keepdim=True)).rsqrt()
                u = r.unsqueeze(-1) * col.rsqrt().unsqueeze(-2) * g
            else:
                v = st.setdefault("v", torch.zeros_like(p))
                v.mul_(b2t).add_(sq, alpha=1 - b2t)
                u = g / v.sqrt()
            u = u / max(1.0, rms(u) / clip) * step
            if beta1 is not None:
                m = st.setdefault("m", torch.zeros_like(p))
                m.mul_(beta1).add_(u, alpha=1 - beta1)
                u = m
            if wd:
                p.add_(p, alpha=-wd * step)
            p.sub_(u)
    return mats


# ----------------------------------------------------------------------- AdamWScale
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fused", [True, False, None])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamwscale_matches_reference(dtype, fused, wd):
    model = toy(dtype)
    params = list(model.parameters())
    blocks = [3 if p is model.fused else 1 for p in params]
    mats = logical([p.detach() for p in params], blocks)
    grads = grad_seq(params)
    opt = AdamWScale([dict(params=params, row_blocks=blocks)], lr=1.0, weight_decay=wd, fused=fused)
    run(opt, params, grads)
    ref = ref_adamwscale(mats, [logical(gs, blocks) for gs in grads], lr_at, wd=wd)
    ours = logical([p.detach() for p in params], blocks)
    assert rel_err(ours, ref) <= tol(dtype)
    # the updates themselves (not just the parameters) agree
    start = logical([p.detach() for p in toy(dtype).parameters()], blocks)
    moved = [(a - s) for a, s in zip(ours, start)]
    assert rel_err(moved, [(r - s) for r, s in zip(ref, start)]) <= 10 * tol(dtype)
    assert min(m.norm() for m in moved) > 0


@pytest.mark.parametrize("fused", [True, False])
def test_adamwscale_without_rms_is_torch_adamw(fused):
    # With the RMS factor fixed to 1, eps = 0 and no weight decay, the two define the same update
    # (they place eps differently around the bias correction and decay at different times).
    a, b = toy(), toy()
    grads = grad_seq(list(a.parameters()), zero_rows=False)  # 0/0 at eps=0
    run(AdamWScale(a.parameters(), lr=1.0, eps=0.0, scale_parameter=False, fused=fused),
        list(a.parameters()), grads)
    run(torch.optim.AdamW(b.parameters(), lr=1.0, eps=0.0, weight_decay=0.0, foreach=False),
        list(b.parameters()), grads)
    assert rel_err(list(a.parameters()), list(b.parameters())) <= 1e-6


def test_adamwscale_rms_factor_matters():
    # guards the test above against a factor that never applies: with scaling the result differs
    a, b = toy(), toy()
    grads = grad_seq(list(a.parameters()), steps=3)
    run(AdamWScale(a.parameters(), lr=1.0), list(a.parameters()), grads)
    run(AdamWScale(b.parameters(), lr=1.0, scale_parameter=False), list(b.parameters()), grads)
    assert rel_err(list(a.parameters()), list(b.parameters())) > 1e-3


@pytest.mark.parametrize("fused", [True, False])
def test_adamwscale_bf16_tracks_fp32(fused):
    # bf16 parameters and state: the same trajectory as fp32, to bf16 precision
    ref, half = toy(), toy().to(torch.bfloat16)
    grads = grad_seq(list(ref.parameters()), steps=10)
    run(AdamWScale(ref.parameters(), lr=1.0, fused=fused), list(ref.parameters()), grads)
    run(AdamWScale(half.parameters(), lr=1.0, fused=fused), list(half.parameters()),
        [[g.bfloat16() for g in gs] for gs in grads])
    assert rel_err(list(half.parameters()), list(ref.parameters())) <= 2e-2


# ------------------------------------------------------------------------ Adafactor
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("wd,beta1", [(0.0, None), (0.1, None), (0.0, 0.9)])
def test_adafactor_matches_reference(dtype, wd, beta1):
    model = toy(dtype)
    params = list(model.parameters())
    blocks = [3 if p is model.fused else 1 for p in params]
    mats = logical([p.detach() for p in params], blocks)
    grads = grad_seq(params)
    opt = Adafactor([dict(params=params, row_blocks=blocks)], lr=1.0, weight_decay=wd, beta1=beta1)
    run(opt, params, grads)
    ref = ref_adafactor(mats, [logical(gs, blocks) for gs in grads], lr_at, wd=wd, beta1=beta1)
    assert rel_err(logical([p.detach() for p in params], blocks), ref) <= tol(dtype)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adafactor_matches_transformers(wd):
    transformers = pytest.importorskip("transformers")
    a, b = toy(), toy()
    grads = grad_seq(list(a.parameters()))
    run(Adafactor(a.parameters(), lr=1.0, weight_decay=wd), list(a.parameters()), grads)
    hf = transformers.Adafactor(b.parameters(), lr=1.0, relative_step=False, scale_parameter=True,
                                warmup_init=False, weight_decay=wd)
    run(hf, list(b.parameters()), grads)
    assert rel_err(list(a.parameters()), list(b.parameters())) <= 1e-6


def test_adafactor_bf16_matches_transformers():
    # half parameters: both update an fp32 copy and round it back
    transformers = pytest.importorskip("transformers")
    a, b = toy(torch.bfloat16), toy(torch.bfloat16)
    grads = grad_seq(list(a.parameters()), steps=10)
    run(Adafactor(a.parameters(), lr=1.0), list(a.parameters()), grads)
    run(transformers.Adafactor(b.parameters(), lr=1.0, relative_step=False), list(b.parameters()), grads)
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, atol=0, rtol=2 ** -7)  # at most one bf16 rounding step


# ----------------------------------------------------------- the real T5, fused matrices
def tiny_t5(seed=0) -> T5:
    torch.manual_seed(seed)
    return T5(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=2,
                       relative_attention_num_buckets=8, relative_attention_max_distance=16))


def hf_split(model: T5, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors (by our name) as HF's separate matrices (by HF name)."""
    return {h: part.clone() for ours, hs in name_table(model.config)
            for h, part in zip(hs, tensors[ours].chunk(len(hs)))}


@pytest.mark.parametrize("name", ["adamwscale", "adafactor"])
def test_t5_fused_matrices_update_like_separate_hf_matrices(name):
    model = tiny_t5()
    named = dict(model.named_parameters())
    groups = param_groups(model, weight_decay=0.01)
    params = [p for g in groups for p in g["params"]]
    grads = grad_seq(params, steps=20)
    hf_params = hf_split(model, {n: p.detach() for n, p in named.items()})
    by_id = {id(p): n for n, p in named.items()}
    hf_grads = [list(hf_split(model, {by_id[id(p)]: g for p, g in zip(params, gs)}).values())
                for gs in grads]
    hf_names = list(hf_params)
    decay = {h for ours, hs in name_table(model.config) for h in hs
             if any(id(named[ours]) == id(p) for p in groups[0]["params"])}
    opt = build_optimizer(name, groups, lr=1.0, weight_decay=0.01)
    run(opt, params, grads)
    # oracle: every HF matrix on its own, weight decay only on the decayed group's matrices
    for wd, keep in ((0.01, True), (0.0, False)):
        mats = [hf_params[h] for h in hf_names if (h in decay) == keep]
        gs = [[g for h, g in zip(hf_names, step) if (h in decay) == keep] for step in hf_grads]
        if name == "adamwscale":
            ref_adamwscale(mats, gs, lr_at, wd=wd)
        else:
            ref_adafactor(mats, gs, lr_at, wd=wd)
    ours = hf_split(model, {n: p.detach() for n, p in named.items()})
    assert rel_err([ours[h] for h in hf_names], [hf_params[h] for h in hf_names]) <= 1e-6


def test_t5_adafactor_matches_transformers_on_hf_matrices():
    transformers = pytest.importorskip("transformers")
    model = tiny_t5()
    named = dict(model.named_parameters())
    groups = param_groups(model, weight_decay=0.0)
    params = [p for g in groups for p in g["params"]]
    by_id = {id(p): n for n, p in named.items()}
    grads = grad_seq(params, steps=20)
    hf_params = [nn.Parameter(t) for t in hf_split(model, {n: p.detach() for n, p in named.items()}).values()]
    hf = transformers.Adafactor(hf_params, lr=1.0, relative_step=False)
    run(hf, hf_params, [list(hf_split(model, {by_id[id(p)]: g for p, g in zip(params, gs)}).values())
                        for gs in grads])
    run(Adafactor(groups, lr=1.0), params, grads)
    ours = list(hf_split(model, {n: p.detach() for n, p in named.items()}).values())
    assert rel_err(ours, hf_params) <= 1e-6


# ---------------------------------------------------------------------- param groups
def test_param_groups_on_t5():
    model = tiny_t5()
    groups = param_groups(model, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decay, no_decay = (set(g["param_names"]) for g in groups)
    expected_no_decay = {n for n, m in model.named_modules()
                         if type(m).__name__ in ("RMSNorm", "RelativePositionBias")}
    assert no_decay == {f"{n}.weight" for n in expected_no_decay}
    assert "encoder.rel_bias.weight" in no_decay  # 2-D, exempt by its module type
    assert decay == {n for n, _ in model.named_parameters()} - no_decay
    for g in groups:
        assert all(dict(model.named_parameters())[n] is p for n, p in zip(g["param_names"], g["params"]))
    blocks = {n: b for g in groups for n, b in zip(g["param_names"], g["row_blocks"])}
    assert {n: b for n, b in blocks.items() if b > 1} == {
        **{f"{s}.blocks.{i}.attn.qkv.weight": 3 for s in ("encoder", "decoder") for i in range(2)},
        **{f"{s}.blocks.{i}.ffn.wi.weight": 2 for s in ("encoder", "decoder") for i in range(2)},
        **{f"decoder.blocks.{i}.cross.kv.weight": 2 for i in range(2)}}


def test_param_groups_by_role_and_ndim():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2, bias=False))
    model.register_parameter("scale", nn.Parameter(torch.tensor(1.0)))
    model.add_module("frozen", nn.Linear(2, 2))
    model.frozen.requires_grad_(False)
    groups = param_groups(model, weight_decay=0.05)
    assert groups[0]["param_names"] == ["0.weight", "2.weight"]
    assert sorted(groups[1]["param_names"]) == ["0.bias", "1.bias", "1.weight", "scale"]
    assert groups[0]["row_blocks"] == [1, 1]
    # usable by every optimizer
    for name in OPTIMIZERS:
        build_optimizer(name, groups, lr=1e-3)


def test_check_param_groups_names_the_offender():
    model = toy()
    params = dict(model.named_parameters())
    missing = [dict(params=[p for n, p in params.items() if n != "cube"])]
    with pytest.raises(ValueError, match="cube is in no param group"):
        check_param_groups(model, missing)
    twice = [dict(params=list(params.values())), dict(params=[params["gain"]])]
    with pytest.raises(ValueError, match="gain is in 2 param groups"):
        check_param_groups(model, twice)
    foreign = [dict(params=list(params.values()) + [nn.Parameter(torch.zeros(7, 2))])]
    with pytest.raises(ValueError, match=r"shape \(7, 2\) in param group 0 is not in the model"):
        check_param_groups(model, foreign)


def test_row_blocks_validated():
    model = toy()
    with pytest.raises(ValueError, match="row_blocks"):
        AdamWScale([dict(params=[model.proj.weight], row_blocks=[4])])  # 6 rows
    with pytest.raises(ValueError, match="row_blocks"):
        Adafactor([dict(params=[model.proj.bias], row_blocks=[2])], lr=1e-3)  # a vector
    with pytest.raises(ValueError, match="row_blocks"):
        Adafactor([dict(params=[model.proj.weight, model.fused], row_blocks=[1])], lr=1e-3)


# --------------------------------------------------------------------- state, syncs
@pytest.mark.parametrize("make", [
    lambda ps: AdamWScale(ps, lr=1e-2, weight_decay=0.1),
    lambda ps: AdamWScale(ps, lr=1e-2, fused=False),
    lambda ps: Adafactor(ps, lr=1e-2, beta1=0.9, weight_decay=0.1),
], ids=["adamwscale", "adamwscale-foreach", "adafactor"])
def test_state_dict_round_trip(make):
    model = toy()
    grads = grad_seq(list(model.parameters()), steps=10)
    straight = copy.deepcopy(model)
    run(make([dict(params=list(straight.parameters()))]), list(straight.parameters()), grads)

    opt = make([dict(params=list(model.parameters()))])
    run(opt, list(model.parameters()), grads[:5])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = toy(seed=123)
    resumed.load_state_dict(saved["model"])
    opt2 = make([dict(params=list(resumed.parameters()))])
    opt2.load_state_dict(saved["opt"])
    run(opt2, list(resumed.parameters()), grads[5:], lrs=lambda t: lr_at(t + 5))
    for a, b in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(a, b)


class NoHostSync(TorchFunctionMode):
    """Fails on every tensor-to-host read (each one a device sync on an accelerator)."""

    READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
             torch.Tensor.__index__, torch.Tensor.__complex__, torch.Tensor.tolist, torch.Tensor.numpy,
             torch.Tensor.cpu}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            raise AssertionError(f"host sync in step: {func.__name__}")
        return func(*args, **(kwargs or {}))


SYNC_FREE = {
    "adamwscale": lambda g: AdamWScale(g, lr=1e-2, weight_decay=0.1),
    "adamwscale-foreach": lambda g: AdamWScale(g, lr=1e-2, weight_decay=0.1, fused=False),
    "adamwscale-unscaled": lambda g: AdamWScale(g, lr=1e-2, scale_parameter=False),
    "adafactor": lambda g: Adafactor(g, lr=1e-2, weight_decay=0.1),
    "adafactor-momentum": lambda g: Adafactor(g, lr=1e-2, beta1=0.9),
}


@pytest.mark.parametrize("name", list(SYNC_FREE))
def test_step_makes_no_host_sync(name):
    model = toy()
    groups = [dict(params=list(model.parameters()),
                   row_blocks=[3 if p is model.fused else 1 for p in model.parameters()])]
    opt = SYNC_FREE[name](groups)
    for gs in grad_seq(list(model.parameters()), steps=3):
        for p, g in zip(model.parameters(), gs):
            p.grad = g
        with NoHostSync():
            opt.step()


def test_no_host_sync_check_catches_nanot5s_step():
    # the check above can fail: nanoT5's per-parameter max(1e-3, rms) is a host read
    p = torch.randn(4, 3)
    with pytest.raises(AssertionError, match="host sync"), NoHostSync():
        ref_adamwscale([p], [[torch.randn(4, 3)]], lr_at)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(SYNC_FREE))
def test_step_makes_no_cuda_sync(name):
    model = toy().cuda()
    groups = [dict(params=list(model.parameters()),
                   row_blocks=[3 if p is model.fused else 1 for p in model.parameters()])]
    opt = SYNC_FREE[name](groups)
    grads = [[g.cuda() for g in gs] for gs in grad_seq(list(model.parameters()), steps=3)]
    torch.cuda.synchronize()
    for gs in grads:
        for p, g in zip(model.parameters(), gs):
            p.grad = g
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # and it computes the same as on the CPU
    cpu = toy()
    opt = SYNC_FREE[name]([dict(params=list(cpu.parameters()),
                                row_blocks=[3 if p is cpu.fused else 1 for p in cpu.parameters()])])
    run(opt, list(cpu.parameters()), [[g.cpu() for g in gs] for gs in grads], lrs=lambda t: 1e-2)
    assert rel_err([p.cpu() for p in model.parameters()], list(cpu.parameters())) <= 1e-5


# ------------------------------------------------------------------------- factory
def test_build_optimizer():
    params = list(toy().parameters())
    assert isinstance(build_optimizer("adamwscale", params, lr=2e-2), AdamWScale)
    assert build_optimizer("adamwscale", params, lr=2e-2).defaults["eps"] == 1e-6
    ada = build_optimizer("adafactor", params, lr=1e-3)
    assert isinstance(ada, Adafactor) and ada.defaults["eps"] == (1e-30, 1e-3)
    adamw = build_optimizer("adamw", params, lr=5e-5, weight_decay=0.01)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.defaults["fused"] and adamw.defaults["weight_decay"] == 0.01
    with pytest.raises(ValueError, match="adamwscale, adafactor, adamw"):
        build_optimizer("lion", params, lr=1e-3)
    with pytest.raises(TypeError, match="float"):
        AdamWScale(params, lr=torch.tensor(1e-3))


# ------------------------------------------------------------------------ schedules
def torch_schedule_values(name, base_lr, warmup, total, final_cosine, steps):
    """nanoT5's scheduler composition (utils/model_utils.py `get_lr_scheduler`), lr per step."""
    from torch.optim.lr_scheduler import (
        CosineAnnealingLR,
        LambdaLR,
        LinearLR,
        SequentialLR,
    )

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
    if name == "cosine":
        sched = SequentialLR(opt, [
            LinearLR(opt, start_factor=0.5, end_factor=1, total_iters=warmup),
            CosineAnnealingLR(opt, T_max=total - warmup, eta_min=final_cosine)], milestones=[warmup])
    else:  # legacy: the lambda's 1/base_lr cancels the optimizer's base_lr
        n1 = math.ceil(total * 0.9)
        sched = SequentialLR(opt, [
            LambdaLR(opt, lambda s: (min(1e-2, 1.0 / math.sqrt(s)) if s else 1e-2) / base_lr),
            LinearLR(opt, start_factor=min(1e-2, 1.0 / math.sqrt(n1)) / base_lr, end_factor=0,
                     total_iters=total - n1)], milestones=[n1])
    values, wanted = {}, set(steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(max(steps) + 1):
            if t in wanted:
                values[t] = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
    return [values[t] for t in steps]


@pytest.mark.parametrize("name", ["cosine", "legacy"])
def test_schedules_match_nanot5_torch_composition(name):
    # nanoT5's defaults: 2^16 steps, 10k warmup, lr 2e-2, final 1e-5
    base, warmup, total, final = 2e-2, 10_000, 65_536, 1e-5
    steps = [0, warmup // 2, warmup, (warmup + total) // 2, total - 1, 58_982, 58_983, 60_000]
    expected = torch_schedule_values(name, base, warmup, total, final, steps)
    fn = lr_schedule(name, base_lr=base, warmup_steps=warmup, total_steps=total, final_cosine=final)
    for t, want in zip(steps, expected):
        assert fn(t) == pytest.approx(want, rel=1e-9, abs=0), t


@pytest.mark.parametrize("name", ["cosine", "legacy"])
@pytest.mark.parametrize("warmup,total", [(20, 200), (7, 31)])
def test_schedules_match_at_every_step(name, warmup, total):
    base = 3e-2 if name == "cosine" else 1.5e-2  # legacy: LinearLR needs start_factor <= 1
    steps = list(range(total))
    expected = torch_schedule_values(name, base, warmup, total, 1e-5, steps)
    fn = lr_schedule(name, base_lr=base, warmup_steps=warmup, total_steps=total)
    assert [fn(t) for t in steps] == pytest.approx(expected, rel=1e-9, abs=0)


@pytest.mark.parametrize("name,warmup", [("constant", 0), ("constant", 10), ("linear", 0), ("linear", 10)])
def test_constant_and_linear_match_transformers(name, warmup):
    transformers = pytest.importorskip("transformers")
    total, base = 100, 5e-5
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    sched = (transformers.get_constant_schedule_with_warmup(opt, warmup) if name == "constant"
             else transformers.get_linear_schedule_with_warmup(opt, warmup, total))
    expected = []
    for _ in range(total + 5):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    fn = lr_schedule(name, base_lr=base, warmup_steps=warmup, total_steps=total)
    assert [fn(t) for t in range(total + 5)] == pytest.approx(expected, rel=1e-12, abs=1e-20)


def test_schedule_edges_and_errors(caplog):
    cos = lr_schedule("cosine", base_lr=1.0, warmup_steps=0, total_steps=10, final_cosine=0.1)
    assert cos(0) == 1.0 and cos(10) == pytest.approx(0.1) and cos(1000) == pytest.approx(0.1)
    with caplog.at_level(logging.WARNING, logger="nanot5.optim"):
        legacy = lr_schedule("legacy", base_lr=123.0, warmup_steps=0, total_steps=100)
    assert "base_lr" in caplog.text
    assert legacy(0) == 1e-2 and legacy(99) > 0 and legacy(100) == 0.0 and legacy(500) == 0.0
    with pytest.raises(ValueError, match="cosine, legacy, constant, linear"):
        lr_schedule("step", base_lr=1.0, warmup_steps=0, total_steps=10)
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_schedule("cosine", base_lr=1.0, warmup_steps=10, total_steps=10)
    with pytest.raises(ValueError, match="step must be >= 0"):
        cos(-1)
