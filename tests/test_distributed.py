"""torchrun on CPU with gloo: DDP and FSDP (AdamWScale, Adafactor, AdamW) equal one process, the optimizers on
FSDP2 shards, two torchrun agents (multi-node), resume across world sizes (sharded checkpoints: SIGKILL mid-save,
2 -> 2, 2 -> 1, 1 -> 2, HF export), failures end the job."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanot5.checkpoint import DCP, list_checkpoints, load_checkpoint

from nanot5.optim import Adafactor, AdamWScale
from nanot5.tracking import read_metrics
from tests.test_train import REPO, tiny_args

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")


def torchrun(nproc: int, args: list[str], timeout: float = 600, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **env_vars}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "nanot5", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def cli_args(test_data: Path, run_dir: Path, *extra: str) -> list[str]:
    return tiny_args(test_data, run_dir, "optim.batch_size=8", "data.num_readers=2", "data.num_workers=0",
                     "eval.every_steps=1000", *extra)


def run(nproc: int, test_data: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = cli_args(test_data, run_dir, *extra)
    res = torchrun(nproc, args) if nproc > 1 else subprocess.run(
        [sys.executable, "-m", "nanot5", *args], cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert res.returncode == 0, res.stderr[-4000:] + res.stdout[-2000:]
    return res


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert ((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() <= tol, k


def train_losses(run_dir: Path) -> list[float]:
    return [e["loss"] for e in read_metrics(run_dir / "metrics.jsonl") if e["kind"] == "train"]


@pytest.fixture(scope="module")
def cached_run(test_data, tmp_path_factory):
    """run(nproc, *args) once per module: the 1-process references serve every strategy."""
    done: dict[tuple, Path] = {}

    def get(nproc: int, *args: str) -> Path:
        if (nproc, args) not in done:
            run_dir = tmp_path_factory.mktemp(f"run{nproc}")
            run(nproc, test_data, run_dir, *args)
            done[nproc, args] = run_dir
        return done[nproc, args]

    return get


def equal_one_args(optim: str, grad_acc: int) -> tuple[str, ...]:
    # checkpoints at steps 2 and 3: the sharded-checkpoint tests below resume these runs from step 2
    return ("optim.total_steps=3", "checkpoint.every_steps=2", f"optim.grad_acc={grad_acc}",
            f"optim.name={optim}", "optim.base_lr=1e-3")


@pytest.mark.parametrize("strategy,optim,grad_acc", [
    ("ddp", "adamwscale", 1), ("ddp", "adamwscale", 2), ("fsdp", "adamwscale", 1), ("fsdp", "adamwscale", 2),
    ("fsdp", "adafactor", 1), ("fsdp", "adafactor", 2), ("fsdp", "adamw", 1)])
def test_two_processes_equal_one(cached_run, strategy, optim, grad_acc):
    # the same global batch; under FSDP the optimizers see row shards of every matrix
    one = cached_run(1, *equal_one_args(optim, grad_acc))
    two = cached_run(2, *equal_one_args(optim, grad_acc), f"distributed.strategy={strategy}")
    assert_close(weights(two), weights(one))
    assert train_losses(two) == pytest.approx(train_losses(one), rel=1e-5)


def test_two_torchrun_agents_equal_one_agent(test_data, tmp_path, cached_run):
    """Multi-node: two torchrun agents (--nnodes=2, one process each) meet at a c10d rendezvous on
    the loopback interface and train as the single-node 2-process run does."""
    args = (*equal_one_args("adamwscale", 1), "distributed.strategy=fsdp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cli = cli_args(test_data, tmp_path / "run", *args)
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
         "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=nanot5-{port}",
         f"--rdzv_conf=is_host={int(host)}", "-m", "nanot5", *cli],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for host in (True, False)]
    try:
        outs = [agent.communicate(timeout=300)[0] for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outs)
    single_node = cached_run(2, *args)
    assert_close(weights(tmp_path / "run"), weights(single_node))
    assert train_losses(tmp_path / "run") == pytest.approx(train_losses(single_node), rel=1e-5)


def test_ddp_resume_with_two_and_with_one_process(test_data, tmp_path):
    common = ["optim.total_steps=6", "checkpoint.every_steps=3", "distributed.strategy=ddp"]
    ref = tmp_path / "ref"
    run(2, test_data, ref, *common)
    # only rank 0 wrote: one line per step, one set of outputs
    steps = [e["step"] for e in read_metrics(ref / "metrics.jsonl") if e["kind"] == "train"]
    assert steps == sorted(set(steps)) == list(range(1, 7))

    for nproc in (2, 1):
        again = tmp_path / f"resume{nproc}"
        shutil.copytree(ref, again)
        shutil.rmtree(again / "checkpoints" / "step_0000006")
        shutil.rmtree(again / "final")
        res = run(nproc, test_data, again, *common, "resume=auto")
        assert "resumed from" in res.stdout and "step_0000003" in res.stdout
        got = [(e["step"], e["loss"]) for e in read_metrics(again / "metrics.jsonl") if e["kind"] == "train"]
        want = [(e["step"], e["loss"]) for e in read_metrics(ref / "metrics.jsonl") if e["kind"] == "train"]
        if nproc == 2:
            assert got == want
            assert all(torch.equal(a, b) for a, b in zip(weights(again).values(), weights(ref).values()))
        else:  # the same data; only the order of floating-point sums differs
            assert [s for s, _ in got] == [s for s, _ in want]
            assert [l for _, l in got] == pytest.approx([l for _, l in want], rel=1e-4)
            assert_close(weights(again), weights(ref), tol=1e-4)


def test_a_dead_rank_ends_the_job_quickly(test_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = tiny_args(test_data, tmp_path / "run", "optim.batch_size=8", "data.num_workers=0",
                     "optim.total_steps=100000", "eval.every_steps=100000", "checkpoint.every_steps=100000")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "nanot5", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    start = time.time()
    while not (metrics.is_file() and metrics.stat().st_size > 0):
        assert proc.poll() is None and time.time() - start < 300, "training did not start"
        time.sleep(0.1)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[1]), signal.SIGKILL)
    killed = time.time()
    out, _ = proc.communicate(timeout=120)
    assert time.time() - killed < 60
    assert proc.returncode != 0
    assert "Signal 9" in out or "SIGKILL" in out or "exitcode" in out, out[-3000:]


# ------------------------------------------------- sharded checkpoints (torch.distributed.checkpoint)
def fsdp_args(optim: str) -> tuple[str, ...]:
    return (*equal_one_args(optim, 1), "distributed.strategy=fsdp")


def meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "meta.json").read_text())


def events(run_dir: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in read_metrics(run_dir / "metrics.jsonl") if e["kind"] == "train"]


@pytest.fixture(scope="module")
def killed_sharded_run(test_data, tmp_path_factory):
    """FSDP on 2 processes, AdamWScale, checkpoint.async_save=true, SIGKILLed (both ranks) in its second save
    (step 3) while the shards are being written in the background; checkpoint 2 is complete."""
    run_dir = tmp_path_factory.mktemp("killed")
    res = torchrun(2, cli_args(test_data, run_dir, *fsdp_args("adamwscale"), "checkpoint.async_save=true"),
                   NANOT5_FAULT="save:2")
    assert res.returncode != 0 and "SIGKILL" in res.stderr + res.stdout, res.stderr[-3000:]
    assert "written in the background" in res.stdout  # checkpoint 2 was put in place after its background write
    root = run_dir / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step_0000002"] and meta(root / "step_0000002")["format"] == DCP
    torn = [p for p in root.iterdir() if p.name.startswith(".tmp-step_0000003")]
    assert len(torn) == 1 and not (torn[0] / "meta.json").exists()
    assert not (run_dir / "final").exists()
    return run_dir


def sharded_source(which: str, cached_run, killed: Path, dest: Path) -> Path:
    """A run folder whose newest usable checkpoint is the sharded step 2 of a 2-process FSDP run: the killed
    asynchronous AdamWScale run, or the uninterrupted Adafactor run with its step-3 outputs removed."""
    if which == "adamwscale-killed-async":
        shutil.copytree(killed, dest)
        return dest
    shutil.copytree(cached_run(2, *fsdp_args("adafactor")), dest)
    for name in ("checkpoints/step_0000003", "final"):
        shutil.rmtree(dest / name)
    (dest / "summary.json").unlink()
    return dest


SOURCES = {"adamwscale-killed-async": "adamwscale", "adafactor": "adafactor"}


@pytest.mark.parametrize("which", SOURCES)
def test_sharded_checkpoint_resumes_on_two_processes_as_if_uninterrupted(test_data, tmp_path, cached_run,
                                                                         killed_sharded_run, which):
    optim = SOURCES[which]
    run_dir = sharded_source(which, cached_run, killed_sharded_run, tmp_path / "run")
    root = run_dir / "checkpoints"
    other = root / "step_0000001"  # another run's checkpoint in the same folder: never pruned
    shutil.copytree(root / "step_0000002", other)
    (other / "meta.json").write_text(json.dumps({**meta(other), "step": 1, "run_id": "another-run"}))
    res = run(2, test_data, run_dir, *fsdp_args(optim), "resume=auto", "checkpoint.keep=1",
              *(["checkpoint.async_save=true"] if "async" in which else []))
    assert f"resumed from {root / 'step_0000002'}" in res.stdout
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]  # the killed save's leftovers
    assert [p.name for p in list_checkpoints(root)] == ["step_0000003", "step_0000001"]
    assert meta(root / "step_0000003")["format"] == DCP
    # the same process count: the uninterrupted run, bit for bit (losses of steps 1-3, final weights)
    ref = cached_run(2, *fsdp_args(optim))
    assert events(run_dir) == events(ref)
    a, b = weights(run_dir), weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("which", SOURCES)
def test_sharded_checkpoint_resumes_on_one_process(test_data, tmp_path, cached_run, killed_sharded_run, which):
    """No process group: DCP hands the whole tensors (weights, AdamWScale moments, Adafactor statistics)
    to the plain model and optimizer; the data stream continues from both ranks' reader states."""
    optim = SOURCES[which]
    run_dir = sharded_source(which, cached_run, killed_sharded_run, tmp_path / "run")
    res = run(1, test_data, run_dir, *fsdp_args(optim), "resume=auto")
    assert f"resumed from {run_dir / 'checkpoints' / 'step_0000002'}" in res.stdout
    one = cached_run(1, *equal_one_args(optim, 1))  # uninterrupted, one process
    assert [s for s, _ in events(run_dir)] == [1, 2, 3]
    assert [l for _, l in events(run_dir)] == pytest.approx([l for _, l in events(one)], rel=1e-5)
    assert_close(weights(run_dir), weights(one))
    assert "format" not in meta(run_dir / "checkpoints" / "step_0000003")  # one process: the single-file format


def test_single_process_checkpoint_resumes_under_fsdp(test_data, tmp_path, cached_run):
    run_dir = tmp_path / "run"
    shutil.copytree(cached_run(1, *equal_one_args("adamwscale", 1)), run_dir)
    for name in ("checkpoints/step_0000003", "final"):
        shutil.rmtree(run_dir / name)
    (run_dir / "summary.json").unlink()
    assert "format" not in meta(run_dir / "checkpoints" / "step_0000002")
    res = run(2, test_data, run_dir, *fsdp_args("adamwscale"), "resume=auto")
    assert "resumed from" in res.stdout and "step_0000002" in res.stdout
    two = cached_run(2, *fsdp_args("adamwscale"))
    assert [l for _, l in events(run_dir)] == pytest.approx([l for _, l in events(two)], rel=1e-5)
    assert_close(weights(run_dir), weights(two))
    assert meta(run_dir / "checkpoints" / "step_0000003")["format"] == DCP


def test_export_of_a_sharded_checkpoint_loads_in_transformers(cached_run, tmp_path):
    """`nanot5 export` in one process, no process group, whatever world size wrote the checkpoint."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from nanot5.build import load_model_dir
    from nanot5.evaluate import export_main

    run_dir = cached_run(2, *fsdp_args("adamwscale"))
    ckpt = run_dir / "checkpoints" / "step_0000003"
    assert meta(ckpt)["format"] == DCP and meta(ckpt)["world_size"] == 2
    out = tmp_path / "hf"
    assert export_main([f"checkpoint={ckpt}", f"out={out}"]) == 0
    exported, final = load_file(out / "model.safetensors"), load_file(run_dir / "final" / "model.safetensors")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    hf = T5ForConditionalGeneration.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ours, _ = load_model_dir(str(ckpt), "cpu")  # what nanot5 evaluate/predict model=CHECKPOINT use
    ids = tok(["The quick brown fox"], return_tensors="pt").input_ids
    labels = tok(["jumps over"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids, labels=labels).logits, ours(ids, labels=labels).logits, atol=1e-5)
    assert load_checkpoint(ckpt)["model"].keys() == ours.state_dict().keys()


# ----------------------------------------------- optimizers on FSDP2 shards (2 spawned processes)
SHARD_CASES = {  # name -> (optimizer factory, all_reduce calls expected per step)
    "adamwscale": (lambda g: AdamWScale(g, lr=1e-2, weight_decay=0.1), 1),
    "adamwscale-foreach": (lambda g: AdamWScale(g, lr=1e-2, fused=False), 1),
    "adamwscale-unscaled": (lambda g: AdamWScale(g, lr=1e-2, scale_parameter=False), 0),
    "adafactor": (lambda g: Adafactor(g, lr=1e-2, weight_decay=0.1), 1),
    "adafactor-momentum": (lambda g: Adafactor(g, lr=1e-2, beta1=0.9, scale_parameter=False), 1),
}


def _sharded_toy() -> torch.nn.Module:
    """Parameters whose dim-0 shards over 2 processes are uneven, cut row blocks, or are empty."""
    torch.manual_seed(0)
    m = torch.nn.Module()
    shapes = {"qkv": (3 * 5, 4),  # 3 blocks of 5 rows; shards of 8 + 7 rows cut block 1
              "wi": (2 * 3, 5),  # 2 blocks; the shard boundary is the block boundary
              "big": (257, 512),  # the fused kernel on both shards (>= 64Ki elements each)
              "odd": (7, 3), "one_row": (1, 6),  # the second process holds 0 rows of one_row
              "norm": (5,), "one": (1,)}
    for name, shape in shapes.items():
        m.register_parameter(name, torch.nn.Parameter(torch.randn(shape) * 0.3 + (1.0 if len(shape) == 1 else 0)))
    return m


def _groups(m):
    named = dict(m.named_parameters())
    mats = ["qkv", "wi", "big", "odd", "one_row"]
    return [dict(params=[named[n] for n in mats], row_blocks=[3, 2, 1, 1, 1], weight_decay=0.1),
            dict(params=[named["norm"], named["one"]], weight_decay=0.0)]


def _sharded_worker(rank: int, world: int, init_file: str, ckpt: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from nanot5 import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    calls = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):  # counts, then does the real collective
        calls.append(1)
        return all_reduce(*args, **kwargs)

    def train(model, opt, grads):
        for gs in grads:
            for p, g in zip(model.parameters(), gs):
                p.grad = distribute_tensor(g, p.device_mesh, p.placements) if hasattr(p, "device_mesh") else g
            calls.clear()
            dist.all_reduce = counting_all_reduce
            try:
                opt.step()
            finally:
                dist.all_reduce = all_reduce
            yield len(calls)

    def sharded():
        m = _sharded_toy()
        fully_shard(m)
        return m

    try:
        for name, (make, expected_calls) in SHARD_CASES.items():
            ref = _sharded_toy()
            gen = torch.Generator().manual_seed(1)
            grads = [[torch.randn(p.shape, generator=gen) * (0.5 + 2 * (t % 3)) for p in ref.parameters()]
                     for t in range(6)]
            list(train(ref, make(_groups(ref)), grads))

            # 3 steps, a full-state checkpoint, a fresh sharded model and optimizer, 3 more steps
            model = sharded()
            opt = make(_groups(model))
            assert list(train(model, opt, grads[:3])) == [expected_calls] * 3, name
            model_state, optim_state = distributed.full_state_dicts(model, opt, "fsdp")
            if rank == 0:
                torch.save({"model": model_state, "optim": optim_state}, ckpt)
            dist.barrier()
            saved = torch.load(ckpt, weights_only=True)
            model = sharded()
            opt = make(_groups(model))
            distributed.load_full_state_dicts(model, opt, saved["model"], saved["optim"], "fsdp")
            assert list(train(model, opt, grads[3:])) == [expected_calls] * 3, name
            for (n, p), q in zip(model.named_parameters(), ref.parameters()):
                full = p.full_tensor()
                err = ((full - q).norm() / q.norm()).item()
                assert err <= 1e-6, f"{name}: {n} differs from one process by {err:.2e}"
                assert not torch.equal(full, _sharded_toy().get_parameter(n)), f"{name}: {n} never moved"
    finally:
        dist.destroy_process_group()


def test_optimizers_on_fsdp_shards_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ckpt.pt")), nprocs=2)
