"""A markdown report comparing runs, with figures.

  python -m eval.report --runs runs/fp runs/w4a4 runs/w2a2 --out report.md

For each run (a training / PTQ run directory, an Orbax checkpoint, or a packed file) the table
gives the method and bits (from the checkpoint metadata or the packed manifest), mIoU and mask
AP (the newest `image_metrics.json`-like file under the run: any JSON with an "mIoU"), J&F (any
JSON with a "J&F"), and the size (any JSON with a "model_ratio", as `eval.size --json` writes,
or the packed file itself). Missing values show as "–". Figures, next to the report:
`training_curves.png` from each run's `metrics.jsonl` (one panel per numeric key, e.g. loss),
and the VRC figures found in each run (PNG files whose name contains "vrc"), copied over.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence

from qsam2_jax.cli import ArgumentParser
from qsam2_jax.errors import UserError, report_user_errors
from qsam2_jax.files import atomic_path, write_text

DASH = "–"
MAX_DEPTH = 4
# Counters and clocks in metrics.jsonl, not curves worth a panel.
NOT_CURVES = ("step", "time", "num_objects")
MAX_CURVES = 6


# ---------------------------------------------------------------------------- reading runs


def _walk(root: str) -> Iterator[str]:
  """Files under `root` (depth-limited), skipping Orbax step folders (they hold no results)."""
  root = os.path.abspath(root)
  base = root.count(os.sep)
  for d, dirs, files in os.walk(root):
    depth = d.count(os.sep) - base
    dirs[:] = sorted(x for x in dirs if depth < MAX_DEPTH and not (
        x.isdigit() and os.path.exists(os.path.join(d, x, "_CHECKPOINT_METADATA")))
        and ".tmp-" not in x)
    for f in sorted(files):
      yield os.path.join(d, f)


def _find(obj: Any, key: str, depth: int = 3) -> Optional[Any]:
  """The value of `key` in a JSON object, searched breadth first a few levels deep."""
  level = [obj]
  for _ in range(depth):
    nxt = []
    for o in level:
      if isinstance(o, dict):
        if key in o and isinstance(o[key], (int, float)) and not isinstance(o[key], bool):
          return o[key]
        nxt.extend(v for v in o.values() if isinstance(v, (dict, list)))
      elif isinstance(o, list):
        nxt.extend(v for v in o if isinstance(v, dict))
    level = nxt
  return None


def _load_json(path: str) -> Optional[Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _newest_with(files: List[str], key: str, kind: Optional[str] = None
                 ) -> Optional[Dict[str, Any]]:
  """The newest JSON holding `key`; files written by the command `kind` win over others."""
  best = None
  for f in files:
    if not f.endswith(".json"):
      continue
    obj = _load_json(f)
    if obj is None or _find(obj, key) is None:
      continue
    rank = (isinstance(obj, dict) and kind is not None and obj.get("kind") == kind,
            os.path.getmtime(f))
    if best is None or rank > best[0]:
      best = (rank, f, obj)
  return None if best is None else {"path": best[1], "data": best[2]}


def run_meta(run: str) -> Dict[str, Any]:
  """Checkpoint metadata of a run (Orbax) or the manifest of a packed file; {} if neither."""
  from qsam2_jax.quant import packed_file
  if os.path.isfile(run) and packed_file.is_packed_file(run):
    m = packed_file.read_manifest(run)
    return {"config": m["config"], "quant": m.get("quant"), "kind": "packed",
            **{k: v for k, v in m.get("source", {}).items() if k == "kind"}}
  if os.path.isdir(run):
    from qsam2_jax.checkpoint import CheckpointError, read_meta
    try:
      return read_meta(run)
    except CheckpointError:
      return {}
  return {}


def method_and_bits(meta: Dict[str, Any]) -> tuple[str, str]:
  q = meta.get("quant")
  kind = meta.get("kind")
  if not q:
    return (kind or DASH), ("FP" if meta else DASH)
  bits = f"W{q['bits']}A{q.get('act_bits') or q['bits']}"
  # A QAT run names its method as the user chose it (qsam2 = LSC quantizers after VRC).
  name = (meta.get("run") or {}).get("method") or q.get("method", "?")
  method = f"{name} ({q.get('preset', '?')})"
  return (f"{kind} {method}" if kind else method), bits


def collect(run: str) -> Dict[str, Any]:
  """Everything the report shows about one run."""
  if not os.path.exists(run):
    raise UserError(f"--runs {run}: no such file or directory")
  if os.path.isdir(run):
    files = list(_walk(run))
  else:   # a file's results sit where `eval.image` puts them by default: <file>_eval/
    from eval.image import default_out
    files = list(_walk(default_out(run))) if os.path.isdir(default_out(run)) else []
  meta = run_meta(run)
  method, bits = method_and_bits(meta)
  image = _newest_with(files, "mIoU", "eval.image")
  video = _newest_with(files, "J&F")
  size = _newest_with(files, "model_ratio", "eval.size")
  row = {"run": run, "name": os.path.basename(os.path.normpath(run)), "method": method,
         "bits": bits, "config": meta.get("config"),
         "mIoU": _find(image["data"], "mIoU") if image else None,
         "AP": _find(image["data"], "AP") if image else None,
         "J&F": _find(video["data"], "J&F") if video else None,
         "size_bytes": None, "size_ratio": None, "sources": {}}
  if size:
    row["size_bytes"] = _find(size["data"], "file_size")
    row["size_ratio"] = _find(size["data"], "model_ratio")
  elif os.path.isfile(run) and meta:
    from qsam2_jax.quant import packed_file
    from qsam2_jax.quant.size import size_report
    m = packed_file.read_manifest(run)
    rep = size_report(m, m["file_size"])
    row["size_bytes"], row["size_ratio"] = rep["file_size"], rep["model_ratio"]
  for name, found in (("image", image), ("video", video), ("size", size)):
    if found:
      row["sources"][name] = found["path"]
  row["metrics_jsonl"] = next((f for f in files if os.path.basename(f) == "metrics.jsonl"),
                              None)
  row["vrc_figures"] = [f for f in files if f.lower().endswith(".png")
                        and "vrc" in os.path.basename(f).lower()]
  if not (meta or row["sources"] or row["metrics_jsonl"] or row["vrc_figures"]):
    raise UserError(f"--runs {run}: nothing to report: not a run, checkpoint or packed file of "
                    "this project, and no results (image_metrics.json, jf.json, eval.size "
                    "JSON, logs/metrics.jsonl) under it")
  return row


def read_metrics_jsonl(path: str) -> List[Dict[str, Any]]:
  """The lines of a `metrics.jsonl` (bad lines skipped: a run may be writing it right now)."""
  out = []
  with open(path) as f:
    for line in f:
      try:
        obj = json.loads(line)
      except ValueError:
        continue
      if isinstance(obj, dict):
        out.append(obj)
  return out


# ---------------------------------------------------------------------------- output


def _num(v: Optional[float], fmt: str = "{:.2f}") -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return DASH
  return fmt.format(v)


def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
  head = "| run | method | bits | mIoU | mask AP | J&F | size |"
  lines = [head, "|---|---|---|---|---|---|---|"]
  for r in rows:
    size = DASH
    if r["size_bytes"] is not None:
      size = f"{r['size_bytes'] / 2**20:.2f} MiB"
      if r["size_ratio"] is not None:
        size += f" ({r['size_ratio']:.2f}x smaller than BF16)"
    lines.append(f"| {r['name']} | {r['method']} | {r['bits']} | {_num(r['mIoU'])} | "
                 f"{_num(r['AP'])} | {_num(r['J&F'])} | {size} |")
  return "\n".join(lines)


def plot_training_curves(rows: Sequence[Dict[str, Any]], path: str) -> Optional[str]:
  """One panel per numeric metric (loss first), one line per run; None if no run has any."""
  series: Dict[str, Dict[str, tuple]] = {}
  for r in rows:
    if not r["metrics_jsonl"]:
      continue
    lines = read_metrics_jsonl(r["metrics_jsonl"])
    keys = sorted({k for ln in lines for k, v in ln.items() if k not in NOT_CURVES
                   and not k.endswith("masks") and isinstance(v, (int, float))
                   and not isinstance(v, bool)})
    for k in keys:
      pts = [(ln.get("step", i), ln[k]) for i, ln in enumerate(lines)
             if isinstance(ln.get(k), (int, float)) and math.isfinite(ln[k])]
      if pts:
        series.setdefault(k, {})[r["name"]] = tuple(zip(*pts))
  if not series:
    return None
  keys = sorted(series, key=lambda k: (k != "loss", "loss" not in k and "miou" not in k, k))
  keys = keys[:MAX_CURVES]
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  cols = min(3, len(keys))
  nrows = -(-len(keys) // cols)
  fig = Figure(figsize=(4.2 * cols, 3.0 * nrows), dpi=110)
  FigureCanvasAgg(fig)
  for i, k in enumerate(keys):
    ax = fig.add_subplot(nrows, cols, i + 1)
    for name, (x, y) in series[k].items():
      ax.plot(x, y, label=name, linewidth=1.2, marker="o" if len(x) < 8 else None,
              markersize=3)
    ax.set_title(k)
    ax.set_xlabel("step")
    if "loss" in k and all(v > 0 for _, ys in series[k].values() for v in ys):
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
  fig.axes[0].legend(fontsize=8)
  fig.tight_layout()
  with atomic_path(path) as tmp:
    fig.savefig(tmp, format="png")
  return path


def build_report(runs: Sequence[str], out: str) -> str:
  """Writes `out` (markdown) and its figures; returns the markdown."""
  rows = [collect(r) for r in runs]
  fig_dir = os.path.join(os.path.dirname(os.path.abspath(out)),
                         os.path.splitext(os.path.basename(out))[0] + "_figures")
  parts = ["# Run comparison", "", markdown_table(rows), ""]
  sources = [f"- {r['name']}: " + ", ".join(f"{k} from `{v}`" for k, v in r["sources"].items())
             for r in rows if r["sources"]]
  if sources:
    parts += ["Values read from:", "", *sources, ""]
  rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(out)))
  curves = plot_training_curves(rows, os.path.join(fig_dir, "training_curves.png"))
  if curves:
    parts += ["## Training curves", "", f"![training curves]({rel(curves)})", ""]
  vrc = [(r, f) for r in rows for f in r["vrc_figures"]]
  if vrc:
    parts += ["## VRC", ""]
    for r, f in vrc:
      dst = os.path.join(fig_dir, f"{r['name']}_{os.path.basename(f)}")
      os.makedirs(fig_dir, exist_ok=True)
      with atomic_path(dst) as tmp:
        shutil.copyfile(f, tmp)
      parts += [f"**{r['name']}**: `{os.path.basename(f)}`", "",
                f"![{r['name']} {os.path.basename(f)}]({rel(dst)})", ""]
  text = "\n".join(parts)
  write_text(out, text)
  return text


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = ArgumentParser(prog="python -m eval.report", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--runs", nargs="+", required=True,
                 help="run directories (or Orbax checkpoints / packed files) to compare")
  p.add_argument("--out", default="report.md",
                 help="markdown file; figures go to <name>_figures/ beside it "
                      "(default: report.md)")
  return p.parse_args(argv)


@report_user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  from qsam2_jax import preflight
  preflight.output_file(args.out, "--out")
  figures = os.path.splitext(os.path.abspath(args.out))[0] + "_figures"
  with preflight.created_by_us(args.out, figures):
    text = build_report(args.runs, args.out)
  print(text.split("\n\n")[1] if "\n\n" in text else text)
  print(f"wrote {os.path.abspath(args.out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
