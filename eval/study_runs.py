"""One step of the quality study: a public command run in its own folder, skipped once done.

A run folder holds `command.txt` (the exact command line, written before it starts), `log.txt`
(its output), `out/` (the command's --out) and, once it succeeded, `done.json`: the command,
wall time, dates, resumes and the metrics `eval.study` read from `out/`. A folder with a
`done.json` is never run again; one without is started over (its `out/` removed), except a
`train.qat` run holding a checkpoint, which continues with `--resume`. A finished run whose
recorded command differs from the planned one is an error (a changed flag would otherwise be
silently ignored): delete the folder or use another --out.

Commands run as `python -m MODULE ...` in a subprocess from the repository root, so each is
exactly what a user could type.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Optional, Sequence

from qsam2_jax.errors import UserError
from qsam2_jax.files import write_json, write_text

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DONE = "done.json"


class RunFailed(RuntimeError):
  """A command of the study exited with an error; the message names its folder and log."""


@dataclasses.dataclass
class Run:
  """`python -m module *args --out <folder>/out` in `folder`.

  resumable: the command continues a checkpoint in --out with --resume (train.qat).
  out_flag: how the command is told where to write (None: the command writes no folder of its
  own and gets none, e.g. eval.size, whose outputs are arguments in `args`).
  metrics: reads the numbers worth keeping from the finished `out/` folder.
  """

  name: str
  folder: str
  module: str
  args: Sequence[str]
  resumable: bool = False
  out_flag: Optional[str] = "--out"
  metrics: Optional[Callable[[str], Dict[str, Any]]] = None

  @property
  def out(self) -> str:
    return os.path.join(self.folder, "out")

  def argv(self) -> list[str]:
    tail = [self.out_flag, self.out] if self.out_flag else []
    return [sys.executable, "-m", self.module, *map(str, self.args), *tail]

  def command_line(self) -> str:
    """The command as typed: `python -m ...` (the interpreter's full path in `argv`)."""
    return shlex.join(["python", *self.argv()[1:]])


def read_done(folder: str) -> Optional[Dict[str, Any]]:
  """The folder's done.json, or None when the run has not finished."""
  path = os.path.join(folder, DONE)
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: unreadable ({e}); delete the run folder to redo it") from e


def is_done(run: Run) -> bool:
  done = read_done(run.folder)
  if done is None:
    return False
  if done.get("command") != run.command_line():
    raise UserError(f"{run.folder} finished with another command than planned now:\n  done: "
                    f"{done.get('command')}\n  now:  {run.command_line()}\ndelete that folder "
                    "to redo the run with the new flags, or use another --out")
  return True


def _has_checkpoint(path: str) -> bool:
  from qsam2_jax import preflight
  return preflight.is_checkpoint_dir(path)


def execute(run: Run, *, say: Callable[[str], None] = print,
            env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
  """Runs `run` unless it is done; returns its done.json content (`skipped` True if it was)."""
  if is_done(run):
    done = read_done(run.folder)
    say(f"  done  {run.name} ({done.get('wall_s', 0):.0f} s)")
    return {**done, "skipped": True}
  os.makedirs(run.folder, exist_ok=True)
  prior: Dict[str, Any] = {}
  state_path = os.path.join(run.folder, "attempts.json")
  if os.path.exists(state_path):
    with open(state_path) as f:
      prior = json.load(f)
  argv = run.argv()
  resumed = run.resumable and _has_checkpoint(run.out)
  if resumed:
    argv.append("--resume")
  elif os.path.lexists(run.out):  # an unfinished attempt that cannot continue: start over
    shutil.rmtree(run.out) if os.path.isdir(run.out) else os.remove(run.out)
  if run.out_flag is None:
    os.makedirs(run.out, exist_ok=True)
  write_text(os.path.join(run.folder, "command.txt"), run.command_line() + "\n")
  attempts = prior.get("attempts", []) + [{"started": _now(), "resume": resumed}]
  write_json(state_path, {"attempts": attempts})
  say(f"  run   {run.name}: {shlex.join(['python', *argv[1:]])}")
  t0 = time.time()
  with open(os.path.join(run.folder, "log.txt"), "a") as log:
    log.write(f"\n$ {shlex.join(argv)}\n")
    log.flush()
    rc = subprocess.call(argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                         env=env if env is not None else os.environ.copy())
  wall = time.time() - t0
  attempts[-1].update(finished=_now(), wall_s=round(wall, 2), rc=rc)
  write_json(state_path, {"attempts": attempts})
  if rc != 0:
    raise RunFailed(f"{run.name} failed (exit {rc}); see {os.path.join(run.folder, 'log.txt')}"
                    f"; rerun the study to {'resume' if run.resumable else 'retry'} it")
  # The wall time of the attempts that made the result: the last fresh start and its resumes.
  fresh = max(i for i, a in enumerate(attempts) if not a["resume"]) if any(
      not a["resume"] for a in attempts) else 0
  made = attempts[fresh:]
  done = {"run": run.name, "command": run.command_line(), "module": run.module,
          "cwd": REPO_ROOT, "out": run.out, "started": made[0]["started"],
          "finished": made[-1]["finished"],
          "wall_s": round(sum(a.get("wall_s", 0.0) for a in made), 2),
          "attempts": len(attempts), "resumes": sum(bool(a["resume"]) for a in made),
          "machine": machine_info(),
          "metrics": run.metrics(run.out) if run.metrics else {}}
  write_json(os.path.join(run.folder, DONE), done)
  say(f"  ok    {run.name} in {wall:.0f} s")
  return {**done, "skipped": False}


_MACHINE: Optional[Dict[str, Any]] = None


def machine_info() -> Dict[str, Any]:
  """Where the runs ran: host, CPU model and count, GPUs (nvidia-smi), package versions."""
  global _MACHINE
  if _MACHINE is None:
    import importlib.metadata as md
    import platform
    cpu = platform.processor() or platform.machine()
    try:
      with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                   cpu)
    except OSError:
      pass
    gpus = []
    if shutil.which("nvidia-smi"):
      try:
        gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                              timeout=20).stdout.strip().splitlines()
      except (OSError, subprocess.SubprocessError):
        gpus = []
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
      try:
        versions[pkg] = md.version(pkg)
      except md.PackageNotFoundError:
        versions[pkg] = None
    _MACHINE = {"host": platform.node(), "os": platform.platform(), "cpu": cpu,
                "cpus": os.cpu_count(), "gpus": gpus, "python": platform.python_version(),
                "versions": versions, "jax_platforms": os.environ.get("JAX_PLATFORMS")}
  return _MACHINE


def _now() -> str:
  return datetime.datetime.now().isoformat(timespec="seconds")
