"""A run's learning curve as a markdown table, from its `logs/metrics.jsonl`.

  python -m eval.curve runs/fp --keys image/loss_dice,eval/miou --every 50

One row per logged step that is a multiple of `--every` (the held-out evaluations' steps are
always kept), one column per key; a key a row lacks shows as "–". This is how the curves in
docs/learning-curve.md and docs/status.md are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

from qsam2_jax.cli import ArgumentParser
from qsam2_jax.errors import UserError, report_user_errors

DASH = "–"


def read_rows(run: str) -> List[Dict[str, float]]:
  """Rows of `<run>/logs/metrics.jsonl` (or of the file itself), merged per step."""
  path = run if run.endswith(".jsonl") else os.path.join(run, "logs", "metrics.jsonl")
  if not os.path.isfile(path):
    raise UserError(f"{run}: no metrics file (expected {path})")
  rows: Dict[int, Dict[str, float]] = {}
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        r = json.loads(line)
        step = int(r["step"])
      except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}:{n}: not a metrics row with a step ({e})") from None
      rows.setdefault(step, {}).update(r)
  return [rows[s] for s in sorted(rows)]


def table(rows: Sequence[Dict[str, float]], keys: Sequence[str], every: int) -> str:
  """Markdown table of `keys` at every `every`-th step and at each evaluation."""
  lines = ["| step | " + " | ".join(keys) + " |", "|---:|" + "---:|" * len(keys)]
  for r in rows:
    if r["step"] % every and not any(k.startswith("eval/") and k in r for k in keys):
      continue
    cells = [DASH if r.get(k) is None else f"{r[k]:.4g}" for k in keys]
    lines.append(f"| {int(r['step'])} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


@report_user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
  p = ArgumentParser(prog="python -m eval.curve", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
  p.add_argument("--keys", default="loss,eval/miou",
                 help="comma-separated metric names (default: loss,eval/miou)")
  p.add_argument("--every", type=int, default=50, help="row spacing in steps (default 50)")
  args = p.parse_args(argv)
  if args.every < 1:
    raise UserError(f"--every must be at least 1, got {args.every}")
  keys = [k for k in args.keys.split(",") if k]
  for run in args.runs:
    print(f"{run}\n\n{table(read_rows(run), keys, args.every)}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
