"""Each process's peak host memory while the main job reads, scores, searches and prunes a
checkpoint, on one process or several sharing a mesh (experiments/benchmarks/host_memory.py).

Every measurement is a fresh set of processes, so its peak resident set (`ru_maxrss` from
`os.wait4`, the kernel's VmHWM at exit) is that step's alone. On CPU devices a device's buffers
are host memory, so the peak counts the params each process holds as well as any host copy. A
step's allowance (jax, XLA's compilations, the data pipeline) is the same step's peak on a
model of a few thousand parameters: what remains is the part that grows with the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
from typing import Sequence

REPO = pathlib.Path(__file__).resolve().parents[2]
GIB = 1 << 30

# What the probe mode of experiments/benchmarks/host_memory.py times: the old whole read (every
# tensor into host numpy in float32, then placed), the read by slices, the restore of the copy.
LOADS = ("hf_load", "sliced", "restore")


@dataclasses.dataclass(frozen=True)
class Layout:
  processes: int
  devices_per_process: int

  @property
  def name(self) -> str:
    return f"{self.processes}x{self.devices_per_process}"

  @classmethod
  def parse(cls, text: str) -> "Layout":
    processes, devices = text.split("x")
    return cls(int(processes), int(devices))


@dataclasses.dataclass(frozen=True)
class Measured:
  """One step on one layout: each process's peak RSS (bytes), the wall time, and the primary
  process's last output lines."""

  peaks: tuple[int, ...]
  seconds: float
  tail: str


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(command: Sequence[str], layout: Layout, timeout: float = 3600) -> Measured:
  """Runs `command` as `layout.processes` processes (each with its share of the simulated CPU
  devices and the coordinator flags when there are several); their peaks, once all exit."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={layout.devices_per_process}"}
  extra = []
  if layout.processes > 1:
    extra = [f"--coordinator_address=localhost:{_free_port()}",
             f"--num_processes={layout.processes}"]
  started = time.perf_counter()
  logs = [open(os.devnull if i else _log_file(), "w+") for i in range(layout.processes)]
  processes = [
      subprocess.Popen([*command, *extra, *([f"--process_id={i}"] if extra else [])], cwd=REPO,
                       env=env, stdout=logs[i], stderr=subprocess.STDOUT, text=True)
      for i in range(layout.processes)]
  peaks, codes = [], []
  deadline = started + timeout
  for process in processes:
    while True:
      pid, status, usage = os.wait4(process.pid, os.WNOHANG)
      if pid:
        break
      if time.perf_counter() > deadline:
        for other in processes:
          other.kill()
        raise TimeoutError(f"{' '.join(command)} ran over {timeout:.0f}s")
      time.sleep(0.2)
    process.returncode = os.waitstatus_to_exitcode(status)
    peaks.append(usage.ru_maxrss * 1024)  # KiB on Linux
    codes.append(process.returncode)
  seconds = time.perf_counter() - started
  logs[0].seek(0)
  tail = "".join(logs[0].readlines()[-30:])
  for log in logs:
    log.close()
  if any(codes):
    raise RuntimeError(f"{' '.join(command)} exited {codes}:\n{tail}")
  return Measured(tuple(peaks), seconds, tail)


def _log_file() -> str:
  path = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"host_memory.{os.getpid()}.log"
  return str(path)


def main_job(config_path: str, workdir: pathlib.Path, settings: dict) -> list[str]:
  """The main job's command line with `settings` (dotted name -> value) over `config_path`
  (strings as they are, other values as Python literals: how config flags parse them)."""
  return [sys.executable, "-u", "-m", "minitron_jax.main", f"--config={config_path}",
          f"--workdir={workdir}",
          *(f"--config.{k}={v if isinstance(v, str) else repr(v)}" for k, v in settings.items())]


def within_target(peak: int, allowance: int, model_float32_bytes: int,
                  fraction: float = 0.6) -> bool:
  """The issue's bound: at most `fraction` of the model's float32 bytes above the allowance."""
  return peak - allowance <= fraction * model_float32_bytes


def gib(value: int | float) -> str:
  return f"{value / GIB:.2f}"


def write_json(path: pathlib.Path, value) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(value, indent=2))
