"""bench/gpu.py works before a GPU is ever lent: `--smoke` runs on the CPU and writes its JSON (every check
with a verdict, the checks the CPU supports passing, numbers finite where measured); an exhausted budget
and errors inside sections still leave a complete JSON; the targets logic on GPU-shaped results."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKS = {"hf_twin", "chunked_vs_plain", "packed_vs_unpacked", "flex_forward", "flex_grads",
          "compiled_vs_eager_step", "compiled_flex_vs_eager_step", "flex_packed"}
CPU_CHECKS = {"hf_twin", "chunked_vs_plain", "packed_vs_unpacked", "compiled_vs_eager_step"}
VARIANTS = {"ours_eager", "ours_compiled", "ours_compiled_flex", "ours_whole", "ours_whole_flex",
            "hf_eager", "hf_sdpa", "hf_eager_compiled", "hf_sdpa_compiled"}
FLEX_VARIANTS = {"ours_compiled_flex", "ours_whole_flex"}
SECTIONS = {"env", "checks", "train", "optimizer", "generate", "beam", "summary"}


def _no_nan(constant: str):
    raise AssertionError(f"non-JSON number {constant} in the results")


def run_bench(tmp_path: Path, *args: str) -> tuple[dict, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--device", "cpu", "--results-dir",
                          str(tmp_path), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    files = list(tmp_path.glob("*.json"))
    assert [f.name for f in files] == ["gpu-cpu-smoke.json"]
    return json.loads(files[0].read_text(), parse_constant=_no_nan), out.stdout


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_smoke_runs_on_cpu_and_writes_its_json(tmp_path):
    data, stdout = run_bench(tmp_path)
    assert data["complete"] and data["mode"] == "smoke" and data["env"]["device"] == "cpu"
    assert {n: s["status"] for n, s in data["sections"].items()} == {s: "done" for s in SECTIONS}
    assert positive(data["env"]["peak_tflops_bf16"]) and positive(data["settings"]["flops_per_step"])

    # every check has a verdict; the CPU ones pass within their tolerances; the others say why not
    assert set(data["checks"]) == CHECKS
    for name, rec in data["checks"].items():
        if name in CPU_CHECKS:
            assert rec["status"] == "pass", (name, rec)
            assert set(rec["diffs"]) == set(rec["tolerance"]) and rec["diffs"]
            for key, diff in rec["diffs"].items():
                assert 0 <= diff <= rec["tolerance"][key], (name, key)
        else:
            assert rec["status"] == "skip" and rec["reason"], (name, rec)

    # every variant: timed (finite numbers, the probe halved 8 -> 4 rows on the simulated OOM) or skipped
    assert set(data["train"]) == VARIANTS
    for name, rec in data["train"].items():
        if name in FLEX_VARIANTS:
            assert rec["status"] == "skip" and "CPU" in rec["reason"]
            continue
        assert rec["status"] == "ok", (name, rec)
        assert (rec["micro_batch"], rec["grad_acc"], len(rec["oom_tried"])) == (4, 2, 1)
        assert len(rec["times"]) == rec["rounds"] == 2 and rec["alternating_rounds"] == 1
        for key in ("step_s", "step_s_min", "step_s_max", "tokens_per_s", "tflops", "mfu", "first_loss", "warmup_s"):
            assert positive(rec[key]), (name, key)
        assert rec["step_s_min"] <= rec["step_s"] <= rec["step_s_max"]
        assert rec["peak_mib"] is None  # torch.cuda.max_memory_allocated: a GPU measurement
        assert rec["valid"] and rec["invalid_because"] == [], (name, rec)

    opt = data["optimizer"]["results"]
    assert set(opt) == {"adamwscale", "adamwscale-foreach", "torch-adamw-fused", "torch-adamw-foreach"}
    assert all(positive(r["step_s"]) for r in opt.values())
    assert positive(data["optimizer"]["adamwscale_vs_torch_fused"])
    for key in ("greedy", "beam2"):
        gen = data["generate"][key]
        assert gen["fp32_identical"] and gen["valid"]
        assert positive(gen["ours"]["tokens_per_s"]) and positive(gen["hf"]["tokens_per_s"])

    proj = data["projection"]
    assert proj["comparable"] is False and proj["best_variant"].startswith("ours") and positive(proj["hours"])
    assert [t["status"] for t in data["targets"]] == ["n/a"] * 3  # GPU targets, T5-base settings
    assert "correctness on the device" in stdout and "targets (issue 14)" in stdout


def test_errors_are_recorded_and_the_run_goes_on(tmp_path):
    data, _ = run_bench(tmp_path, "--inject-error", "chunked_vs_plain,hf_eager,optimizer",
                        "--checks", "hf_twin,chunked_vs_plain", "--variants", "ours_eager,hf_eager", "--beams", "0")
    assert data["complete"]
    assert data["checks"]["chunked_vs_plain"]["status"] == "error"
    assert "injected" in data["checks"]["chunked_vs_plain"]["error"]
    assert data["checks"]["hf_twin"]["status"] == "pass"
    assert data["checks"]["flex_grads"]["reason"] == "not selected (--checks)"
    ours = data["train"]["ours_eager"]
    assert ours["status"] == "ok" and not ours["valid"]  # its numbers depend on the check that errored
    assert ours["invalid_because"] == ["chunked_vs_plain: error"]
    assert data["train"]["hf_eager"]["status"] == "error"
    assert data["train"]["hf_sdpa"]["reason"] == "not selected (--variants)"
    assert data["sections"]["optimizer"]["status"] == "error"
    assert data["sections"]["generate"]["status"] == "done" and data["generate"]["greedy"]["valid"]
    assert "best_variant" not in data["projection"]  # no valid measurement of ours


def test_an_exhausted_budget_skips_every_section_and_still_writes_the_layout(tmp_path):
    data, stdout = run_bench(tmp_path, "--budget-s", "0")
    assert data["complete"]
    sections = data["sections"]
    assert sections.pop("summary")["status"] == "done"
    assert set(sections) == SECTIONS - {"summary"}
    assert all(s["status"] == "skipped" and s["reason"].startswith("budget") for s in sections.values())
    assert set(data["checks"]) == CHECKS and set(data["train"]) == VARIANTS
    assert all(r["status"] == "skip" for r in [*data["checks"].values(), *data["train"].values()])
    assert [t["status"] for t in data["targets"]] == ["n/a"] * 3
    assert "sections not done" in stdout


# ----------------------------------------------------------------------------- targets (pure function)
@pytest.fixture(scope="module")
def gpu_bench():
    sys.path.insert(0, str(ROOT))
    import bench.gpu as gpu_bench

    return gpu_bench


def gpu_report(flex_grads: str = "pass") -> dict:
    """Results shaped as a run on an H200 at the recipe's settings would leave them."""
    checks = {name: {"status": "pass"} for name in CHECKS}
    checks["flex_grads"]["status"] = flex_grads

    def variant(compile_, step_s, mfu, peak_mib, micro):
        return {"status": "ok", "compile": compile_, "step_s": step_s, "mfu": mfu, "peak_mib": peak_mib,
                "micro_batch": micro, "first_loss": 10.4}

    train = {"ours_eager": variant(None, 0.30, 0.18, 60000.0, 128),
             "ours_compiled_flex": variant("block", 0.11, 0.50, 30000.0, 128),
             "hf_sdpa_compiled": variant("whole", 0.20, 0.28, 45000.0, 64),
             "hf_eager": {"status": "error"}}
    settings = {"model": "t5-v1_1-base", "input_len": 512, "target_len": 114, "global_batch": 128}
    return {"checks": checks, "train": train, "settings": settings, "env": {"device": "cuda"}}


def test_targets_on_gpu_results(gpu_bench):
    data = gpu_report()
    proj, targets = gpu_bench.summarize(data, "NVIDIA H200")
    assert data["train"]["ours_compiled_flex"]["valid"] and data["train"]["hf_sdpa_compiled"]["valid"]
    assert proj["comparable"] and proj["best_variant"] == "ours_compiled_flex"
    assert proj["hours"] == pytest.approx(65536 * 0.11 / 3600)
    assert proj["speedup_vs_nanoT5_a100"] == pytest.approx(0.56 / 0.11)
    got = {t["name"]: (t["value"], t["status"]) for t in targets}
    assert got == {"mfu": (0.50, "met"), "vs_hf_compiled": (pytest.approx(0.20 / 0.11), "met"),
                   "memory_below_hf": (pytest.approx(30000 / 45000), "met")}
    # an A100 is no H100/H200-class card: the MFU target does not apply there
    _, targets = gpu_bench.summarize(gpu_report(), "NVIDIA A100-SXM4-80GB")
    assert targets[0]["status"] == "n/a"


def test_a_failed_check_invalidates_the_speed_numbers_that_depend_on_it(gpu_bench):
    data = gpu_report(flex_grads="fail")
    proj, targets = gpu_bench.summarize(data, "NVIDIA H200")
    assert not data["train"]["ours_compiled_flex"]["valid"]
    assert data["train"]["ours_compiled_flex"]["invalid_because"] == ["flex_grads: fail"]
    assert proj["best_variant"] == "ours_eager"  # the best valid one
    got = {t["name"]: t["status"] for t in targets}
    assert got == {"mfu": "not met", "vs_hf_compiled": "not met", "memory_below_hf": "not met"}
