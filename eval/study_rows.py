"""The rows of the quality study's table (issue 14): which model each row is and how it is made.

A row is one model of the comparison: the FP proxy, a PTQ method at a width, a QAT method at a
width, an ablation at W2A2, or an extra seed. Rows hold no paths and run nothing; `eval.study`
turns them into commands. Names are stable (run folders are named after them), lower case:
`fp`, `ptq-mse-w4a4`, `qat-lsq-w2a2`, `qat-qsam2-w2a2-s1`, `abl-lsc-w2a2`.

QAT learning rates are picked per method at W2A2 on the validation split (`LR_METHOD` says whose
choice an ablation reuses) and kept for the other widths. The "best baseline" of the extra seeds
is the baseline with the best validation mIoU at its chosen LR, so its seed rows are named
`qat-best-w2a2-s1` until that is known.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Optional, Sequence, Tuple

from qsam2_jax.errors import UserError

PTQ_METHODS = ("minmax", "mse", "vrc+mse")          # train.ptq --method
PTQ_BITS = (8, 4, 2)
QAT_METHODS = ("minmax", "pact", "lsq", "qsam2")    # train.qat --method
QAT_BASELINES = ("minmax", "pact", "lsq")
QAT_BITS = (4, 3, 2)
ABLATION_BITS = 2
BEST = "best"   # placeholder method of the best baseline's extra seeds

# Display names, paper spelling.
LABELS = {"fp": "FP (proxy)", "ptq-minmax": "PTQ min-max", "ptq-mse": "PTQ MSE",
          "ptq-vrc+mse": "PTQ VRC + MSE", "qat-minmax": "QAT min-max", "qat-pact": "PACT",
          "qat-lsq": "LSQ", "qat-qsam2": "Q-SAM2 (VRC + LSC)", "qat-best": "best baseline",
          "abl-lsc": "LSC without VRC", "abl-vrc+lsq": "VRC + LSQ",
          "abl-nomomentum": "Q-SAM2, LSC without momentum",
          "abl-attnfloat": "Q-SAM2, attention matmuls float"}


@dataclasses.dataclass(frozen=True)
class Row:
  """One model of the table.

  kind: fp | ptq | qat | ablation. method: the command's --method (for ablations the method
  trained, `qat_flags` the flags that make the ablation). variant: the ablation's id. lr_of:
  whose W2A2 learning-rate choice this row uses (QAT and ablations). vrc_init: trained from a
  `train.calibrate` (VRC) checkpoint of the proxy (VRC + LSQ: train.qat has no VRC for lsq).
  """

  kind: str
  method: str = ""
  bits: int = 16
  seed: int = 0
  variant: str = ""
  qat_flags: Tuple[str, ...] = ()
  lr_of: str = ""
  vrc_init: bool = False

  @property
  def family(self) -> str:
    """The row's line of the table, seeds pooled: `qat-qsam2`, `ptq-vrc+mse`, `abl-lsc`."""
    if self.kind == "fp":
      return "fp"
    if self.kind == "ablation":
      return f"abl-{self.variant}"
    return f"{self.kind}-{self.method}"

  @property
  def name(self) -> str:
    if self.kind == "fp":
      return "fp"
    base = f"{self.family}-w{self.bits}a{self.bits}".replace("+", "")
    return base + (f"-s{self.seed}" if self.seed else "")

  @property
  def group(self) -> str:
    """The table line: the name without the seed."""
    return self.name.rsplit("-s", 1)[0] if self.seed else self.name

  @property
  def label(self) -> str:
    return LABELS[self.family]

  @property
  def trains(self) -> bool:
    return self.kind in ("qat", "ablation")


def table_rows(seeds: Sequence[int] = (0, 1, 2)) -> list[Row]:
  """Every row of the issue's table, in the order the table lists them."""
  rows = [Row("fp")]
  rows += [Row("ptq", m, b) for b in PTQ_BITS for m in PTQ_METHODS]
  rows += [Row("qat", m, b, lr_of=m) for b in QAT_BITS for m in QAT_METHODS]
  a = ABLATION_BITS
  rows += [Row("ablation", "lsc", a, variant="lsc", lr_of="qsam2"),
           Row("ablation", "lsq", a, variant="vrc+lsq", lr_of="lsq", vrc_init=True),
           Row("ablation", "qsam2", a, variant="nomomentum", lr_of="qsam2",
               qat_flags=("--ema-momentum", "0")),
           Row("ablation", "qsam2", a, variant="attnfloat", lr_of="qsam2",
               qat_flags=("--attn-bits", "16", "--softmax-bits", "16"))]
  extra = [s for s in seeds if s != 0]
  rows += [Row("qat", "qsam2", 2, seed=s, lr_of="qsam2") for s in extra]
  rows += [Row("qat", BEST, 2, seed=s, lr_of=BEST) for s in extra]
  return rows


def resolve_best(row: Row, best: Optional[str]) -> Row:
  """The row with the best baseline filled in (`best` None: unchanged)."""
  if row.method != BEST or best is None:
    return row
  if best not in QAT_BASELINES:
    raise ValueError(f"best baseline {best!r} is not one of {QAT_BASELINES}")
  return dataclasses.replace(row, method=best, lr_of=best)


def select(rows: Sequence[Row], spec: Optional[str]) -> list[Row]:
  """The rows `--rows` names: comma-separated names or shell patterns (`qat-*-w2a2`), matched
  against the names (`qat-best-w2a2-s1` before the best baseline is known); None: all rows.

  A pattern that matches nothing is an error naming it and the known names.
  """
  if spec is None:
    return list(rows)
  wanted = [p.strip() for p in spec.split(",") if p.strip()]
  if not wanted:
    raise UserError("--rows: give at least one row name or pattern")
  names = [r.name for r in rows]
  for p in wanted:
    if not fnmatch.filter(names, p):
      raise UserError(f"--rows: {p!r} matches no row; rows are: {', '.join(names)}")
  return [r for r in rows if any(fnmatch.fnmatchcase(r.name, p) for p in wanted)]
