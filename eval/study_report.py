"""The quality study's report (docs/results.md): every number read from the runs' done.json.

Rows that share a table line (the seeds of one method and width) are pooled as mean ± sample
standard deviation (n - 1 in the denominator); a line whose runs are not all done shows the
runs that are, with their count. Missing values are "–". The comparison with the paper is left
as a marked placeholder listing each claim beside the gap measured here.
"""

from __future__ import annotations

import datetime
import math
import os
import shutil
from typing import Any, Dict, List, Optional, Sequence

from eval import study_rows as sr
from eval.study_runs import read_done
from qsam2_jax.files import atomic_path, write_text

DASH = "–"
# Table columns: key -> (header, eval folder, metric key, scale).
COLUMNS = {
    "box": ("box mIoU", "image-box", "mIoU", 1.0),
    "click": ("1-click mIoU", "image-click", "mIoU", 1.0),
    "small": ("box small", "image-box", "mIoU_small", 1.0),
    "medium": ("box medium", "image-box", "mIoU_medium", 1.0),
    "large": ("box large", "image-box", "mIoU_large", 1.0),
    "jf": ("J&F", "video", "J&F", 1.0),
    "size": ("× smaller than BF16", "size", "model_ratio", 1.0),
}
CLAIMS = (
    ("Q-SAM2 vs the best QAT baseline at W2A2, box mIoU", "+7.3 ppt mIoU"),
    ("Q-SAM2 vs the best QAT baseline at W2A2, J&F", "+9.7 ppt J&F"),
    ("VRC + MSE vs plain MSE PTQ, box mIoU, relative", "up to 66 % better"),
    ("packed W2A2 Q-SAM2 vs BF16", "8× smaller"),
)


# ---------------------------------------------------------------------------- statistics


def mean_std(values: Sequence[float]) -> tuple[Optional[float], Optional[float], int]:
  """(mean, sample std or None for one value, n) of the finite values; (None, None, 0) if none."""
  v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
  if not v:
    return None, None, 0
  m = sum(v) / len(v)
  if len(v) == 1:
    return m, None, 1
  return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)), len(v)


def fmt(stat: tuple, digits: int = 2) -> str:
  m, s, n = stat
  if m is None:
    return DASH
  return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None else "")


def fmt_seconds(s: Optional[float]) -> str:
  if s is None:
    return DASH
  if s < 120:
    return f"{s:.0f} s"
  if s < 7200:
    return f"{s / 60:.1f} min"
  return f"{s / 3600:.2f} h"


# ---------------------------------------------------------------------------- collecting


def row_values(plan, row: sr.Row) -> Optional[Dict[str, Any]]:
  """{column: value, "wall_s": s} of one (resolved) row, None while its model is not made."""
  runs = plan.model_runs(row)
  if runs is None:
    return None
  dones = [read_done(r.folder) for r in runs]
  if any(d is None for d in dones):
    return None
  if row.kind == "fp":   # the proxy's time is its pretraining (the init is a conversion)
    dones = [d for d, r in zip(dones, runs) if r.module == "train.qat"]
  out: Dict[str, Any] = {"wall_s": sum(d["wall_s"] for d in dones) if dones else None}
  name = plan.resolve(row).name
  for key, (_, folder, metric, scale) in COLUMNS.items():
    d = read_done(plan.folder("eval", name, folder))
    v = None if d is None else d.get("metrics", {}).get(metric)
    out[key] = None if v is None else scale * float(v)
  if row.trains:
    out["val_miou"] = dones[-1].get("metrics", {}).get("val_miou")
  return out


def collect(plan) -> List[Dict[str, Any]]:
  """One entry per table line (seeds pooled), in table order."""
  lines: Dict[str, Dict[str, Any]] = {}
  for row in plan.rows():
    r = plan.resolve(row)
    key = r.group if r is not None else row.group
    line = lines.setdefault(key, {"group": key, "row": r or row, "label": (r or row).label,
                                  "bits": row.bits, "runs": [], "missing": []})
    vals = row_values(plan, r) if r is not None else None
    (line["runs"] if vals is not None else line["missing"]).append(
        {"name": (r or row).name, **(vals or {})})
  for line in lines.values():
    for key in list(COLUMNS) + ["wall_s"]:
      line[key] = mean_std([x.get(key) for x in line["runs"]])
  return list(lines.values())


def floors(plan) -> Dict[str, Dict[str, Any]]:
  out = {}
  for kind in ("floor-box", "floor-ellipse"):
    d = read_done(plan.folder("eval", kind, "image-box"))
    if d is not None:
      out[kind] = d["metrics"]
  return out


# ---------------------------------------------------------------------------- gaps


def _line(lines, group: str) -> Optional[Dict[str, Any]]:
  return next((ln for ln in lines if ln["group"] == group and ln["runs"]), None)


def _mean(line, key) -> Optional[float]:
  return None if line is None else line[key][0]


def gaps(lines: Sequence[Dict[str, Any]], floor: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
  """The measured counterparts of the paper's claims (and a few more), from the table lines.

  The best baseline of a column is the QAT baseline (min-max, PACT, LSQ) with the highest mean
  in that column at W2A2.
  """
  out: Dict[str, Any] = {}
  q2 = _line(lines, "qat-qsam2-w2a2")
  for key in ("box", "jf"):
    base = [(m, _line(lines, f"qat-{m}-w2a2")) for m in sr.QAT_BASELINES]
    base = [(m, ln) for m, ln in base if _mean(ln, key) is not None]
    if q2 is None or _mean(q2, key) is None or not base:
      out[key] = None
      continue
    m, ln = max(base, key=lambda t: _mean(t[1], key))
    out[key] = {"qsam2": q2[key], "best": m, "baseline": ln[key],
                "gap": _mean(q2, key) - _mean(ln, key)}
  vrc = {}
  for b in sr.PTQ_BITS:
    mse, v = _mean(_line(lines, f"ptq-mse-w{b}a{b}"), "box"), _mean(
        _line(lines, f"ptq-vrcmse-w{b}a{b}"), "box")
    if mse is not None and v is not None:
      vrc[b] = {"mse": mse, "vrc+mse": v, "abs": v - mse,
                "rel": (v - mse) / mse * 100 if mse > 0 else None}
  out["vrc"] = vrc
  out["size"] = _mean(q2, "size")
  fp, q4 = _line(lines, "fp"), _line(lines, "qat-qsam2-w4a4")
  out["w4_vs_fp"] = {k: _mean(q4, k) - _mean(fp, k) for k in ("box", "jf")
                     if _mean(q4, k) is not None and _mean(fp, k) is not None}
  best_floor = max((f.get("mIoU") for f in floor.values() if f.get("mIoU") is not None),
                   default=None)
  out["fp_vs_floor"] = (None if best_floor is None or _mean(fp, "box") is None
                        else _mean(fp, "box") - best_floor)
  return out


def _gap_text(g: Dict[str, Any]) -> List[str]:
  def pair(x, key):
    if x is None:
      return f"not measured yet ({key})"
    return (f"Q-SAM2 {fmt(x['qsam2'])} vs {x['best']} {fmt(x['baseline'])}: "
            f"**{x['gap']:+.2f} ppt**")
  rel = [v["rel"] for v in g["vrc"].values() if v["rel"] is not None]
  vrc = ("; ".join(f"W{b}A{b}: MSE {v['mse']:.2f} → VRC+MSE {v['vrc+mse']:.2f} "
                   f"({v['abs']:+.2f} ppt" + (f", {v['rel']:+.1f} %)" if v["rel"] is not None
                                               else ")")
                   for b, v in g["vrc"].items())
         + (f"; largest **{max(rel):+.1f} %**" if rel else "")) if g["vrc"] else \
      "not measured yet (ptq-mse / ptq-vrcmse rows)"
  size = (f"**{g['size']:.2f}×** (packed file on disk vs BF16 state dict)"
          if g["size"] is not None else "not measured yet")
  return [pair(g["box"], "qat-*-w2a2 rows, box"), pair(g["jf"], "qat-*-w2a2 rows, video"),
          vrc, size]


# ---------------------------------------------------------------------------- figures


def plot_miou_vs_bits(lines, floor, path: str) -> Optional[str]:
  """Box mIoU against bits, one line per PTQ / QAT method (error bars: seed std); FP and the
  floors as horizontal lines."""
  series: Dict[str, List[tuple]] = {}
  for ln in lines:
    r = ln["row"]
    if r.kind not in ("ptq", "qat") or ln["box"][0] is None or r.method == sr.BEST:
      continue
    series.setdefault(ln["label"], []).append((ln["bits"], ln["box"][0], ln["box"][1] or 0.0))
  if not series:
    return None
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(6.4, 4.2), dpi=110)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  for label, pts in series.items():
    pts.sort()
    x, y, e = zip(*pts)
    ax.errorbar(x, y, yerr=e, marker="o", capsize=3, linewidth=1.3,
                linestyle="--" if label.startswith("PTQ") else "-", label=label)
  fp = _line(lines, "fp")
  if fp is not None and fp["box"][0] is not None:
    ax.axhline(fp["box"][0], color="k", linewidth=1.2, label="FP proxy")
  for kind, m in floor.items():
    if m.get("mIoU") is not None:
      ax.axhline(m["mIoU"], color="grey", linestyle=":", linewidth=1.0, label=kind)
  ax.set_xlabel("bits (W = A)")
  ax.set_ylabel("box mIoU (test, %)")
  ax.set_xticks(sorted({b for pts in series.values() for b, _, _ in pts}))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  with atomic_path(path) as tmp:
    fig.savefig(tmp, format="png")
  return path


def _training_curves(plan, lines, path: str) -> Optional[str]:
  from eval.report import plot_training_curves
  runs = []
  for pre, label in zip(plan.pretrain_runs(), ("FP pretrain (boxes)",
                                               "FP pretrain (boxes + clicks)")):
    if read_done(pre.folder):
      runs.append({"name": label, "metrics_jsonl": os.path.join(pre.out, "logs",
                                                                "metrics.jsonl")})
  for ln in lines:
    r = ln["row"]
    if r.trains and r.bits == 2 and r.seed == 0 and ln["runs"]:
      model = plan.model_path(r)
      f = os.path.join(model, "logs", "metrics.jsonl")
      if os.path.exists(f):
        runs.append({"name": ln["group"], "metrics_jsonl": f})
  runs = [r for r in runs if os.path.exists(r["metrics_jsonl"])]
  return plot_training_curves(runs, path) if runs else None


def _vrc_figures(plan, fig_dir: str) -> List[tuple[str, str]]:
  """VRC's plots of the trained proxy (train.calibrate at W2, the Q-SAM2 W2A2 run, VRC+MSE
  PTQ at W2A2), copied next to the report."""
  out = []
  sources = [("train.calibrate W2", plan.vrc_run().out)]
  for name in ("qat-qsam2-w2a2", "ptq-vrcmse-w2a2"):
    row = next((r for r in sr.table_rows(plan.a.seeds) if r.name == name), None)
    path = plan.model_path(row) if row is not None else None
    if path:
      sources.append((name, path))
  for label, folder in sources:
    if not os.path.isdir(folder) or read_done(os.path.dirname(folder)) is None:
      continue
    for dirpath, _, files in os.walk(folder):
      for f in sorted(files):
        if f.endswith(".png") and "vrc" in f:
          dst = os.path.join(fig_dir, f"{label.replace(' ', '_')}_{f}")
          os.makedirs(fig_dir, exist_ok=True)
          with atomic_path(dst) as tmp:
            shutil.copyfile(os.path.join(dirpath, f), tmp)
          out.append((label, dst))
  return out


# ---------------------------------------------------------------------------- markdown


def _all_runs(plan) -> List[Any]:
  runs = list(plan.data_runs())
  for r in (plan.init_run(), *plan.pretrain_runs()):
    if r is not None:
      runs.append(r)
  for m in sr.QAT_METHODS:
    runs += plan.lr_runs(m)
  seen = {r.folder for r in runs}
  for row in plan.rows():
    for r in plan.model_runs(row) or []:
      if r.folder not in seen:
        runs.append(r)
        seen.add(r.folder)
    model = plan.model_path(row)
    if model and plan.resolve(row) is not None:
      runs += plan.eval_runs(row, model)
  return runs + plan.floor_runs()


def build(plan, out: str) -> str:
  lines = collect(plan)
  floor = floors(plan)
  g = gaps(lines, floor)
  base = os.path.dirname(os.path.abspath(out))
  fig_dir = os.path.splitext(os.path.abspath(out))[0] + "_figures"
  rel = lambda p: os.path.relpath(p, base)
  a = plan.a
  dones = [(r, read_done(r.folder)) for r in _all_runs(plan)]
  dones = [(r, d) for r, d in dones if d is not None]
  machines = []
  for _, d in dones:
    m = d.get("machine")
    if m and m not in machines:
      machines.append(m)
  dates = sorted(d["finished"] for _, d in dones if d.get("finished"))
  p = ["# Quality study: SAM2.1-t proxy, PTQ and QAT at 2-8 bits", "",
       f"Written by `python -m eval.study --stage report` on "
       f"{datetime.datetime.now().isoformat(timespec='minutes')} from the run folders under "
       f"`{a.out}` (runs finished {dates[0] if dates else DASH} … {dates[-1] if dates else DASH})."
       " Do not edit the numbers by hand: rerun the command.", "",
       "## Setup", "",
       f"- Data: {_data_text(plan)}",
       f"- Model: SAM2.1-t at {a.image_size}², FP proxy "
       + (f"= `{a.init}`" if a.pretrain_steps == 0 else
          f"trained {a.pretrain_steps} steps with {a.pretrain_box_prob:g} box prompts"
          + (f", then {a.pretrain_mixed_steps} steps with {a.pretrain_mixed_box_prob:g} box "
             "prompts (the rest clicks)" if a.pretrain_mixed_steps else "")
          + " from " + (f"`{a.init}`" if a.init else "PyTorch's default init")
          + f" (lr {a.pretrain_lr:g}, vision lr {a.pretrain_vision_lr:g}, batch {a.batch_size}, "
          f"{a.masks_per_image} masks / image, clip steps {a.video_ratio:g})"),
       f"- QAT budget: {a.qat_steps} steps per run, batch {a.batch_size}; LR per method from "
       f"{', '.join(f'{v:g}' for v in a.lr_grid)} at W2A2 by validation mIoU: "
       + (", ".join(f"{m} {c[0]:g} (val {c[1]:.4f})" for m in sr.QAT_METHODS
                    if (c := plan.lr_choice(m)) is not None) or "not chosen yet")
       + f"; best baseline (val): {plan.best_baseline() or 'not known yet'}.",
       f"- Seeds at W2A2: {', '.join(map(str, a.seeds))} (mean ± sample std over seeds).",
       "- Metrics on the test split: mIoU (%) with the ground-truth box, with one positive "
       "click (the innermost pixel; best of three outputs), box mIoU per COCO area (small < "
       "32², medium < 96² px); J&F (%) with the first frame's mask as the prompt; the packed "
       "file's size vs the BF16 state dict; wall time of the run that made the model.", ""]
  for m in machines:
    p.append(f"- Machine: {m.get('cpu')} ({m.get('cpus')} CPUs)"
             + (f", {', '.join(m['gpus'])}" if m.get("gpus") else ", no GPU")
             + f"; Python {m.get('python')}, "
             + ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items() if v)
             + f"; {m.get('os')}")
  total = sum(d["wall_s"] for _, d in dones)
  p += ["", f"Total wall time of the finished runs: {fmt_seconds(total)}.", "",
        "## Table", "",
        "| model | bits | " + " | ".join(h for h, *_ in COLUMNS.values()) + " | wall | runs |",
        "|---|---|" + "---|" * len(COLUMNS) + "---|---|"]
  for ln in lines:
    bits = "16" if ln["row"].kind == "fp" else f"W{ln['bits']}A{ln['bits']}"
    n = len(ln["runs"])
    runs = f"{n}" + (f" (+{len(ln['missing'])} not done)" if ln["missing"] else "")
    cells = [fmt(ln[k]) for k in COLUMNS]
    p.append(f"| {ln['label']} | {bits} | " + " | ".join(cells)
             + f" | {fmt_seconds(ln['wall_s'][0])} | {runs} |")
  p += ["", "## Floors", "",
        "The prompt box itself as the mask (every pixel centre inside it) and the ellipse "
        "inscribed in it, scored by `eval.image`'s metric code on the same test split.", "",
        "| floor | box mIoU | small | medium | large |", "|---|---|---|---|---|"]
  for kind, m in floor.items():
    p.append(f"| {kind} | " + " | ".join(fmt((m.get(k), None, 1)) for k in (
        "mIoU", "mIoU_small", "mIoU_medium", "mIoU_large")) + " |")
  if not floor:
    p.append("| (not evaluated yet) | – | – | – | – |")
  p += ["", "## Comparison with the paper's claims", "",
        "> **PLACEHOLDER — prose for a later session.** Each claim of the paper beside the gap "
        "measured above; the honest comparison (where it differs, why) is still to be written.",
        "", "| claim (paper) | measured here |", "|---|---|"]
  for (what, claim), measured in zip(CLAIMS, _gap_text(g)):
    p.append(f"| {what}: {claim} | {measured} |")
  w4 = g["w4_vs_fp"]
  p += ["", "Also measured: W4A4 Q-SAM2 − FP: "
        + (", ".join(f"{k} {v:+.2f} ppt" for k, v in w4.items()) or "not measured yet")
        + "; FP − best floor (box mIoU): "
        + (f"{g['fp_vs_floor']:+.2f} ppt" if g["fp_vs_floor"] is not None else "not measured yet")
        + ".", ""]
  figs = []
  f1 = plot_miou_vs_bits(lines, floor, os.path.join(fig_dir, "miou_vs_bits.png"))
  if f1:
    figs += [f"![box mIoU vs bits]({rel(f1)})", ""]
  f2 = _training_curves(plan, lines, os.path.join(fig_dir, "training_curves.png"))
  if f2:
    figs += ["Training curves (FP pretraining and the W2A2 runs, seed 0):", "",
             f"![training curves]({rel(f2)})", ""]
  for label, f in _vrc_figures(plan, fig_dir):
    figs += [f"VRC, {label}: `{os.path.basename(f)}`", "", f"![{label}]({rel(f)})", ""]
  p += ["## Figures", ""] + (figs or ["(none yet)", ""])
  p += ["## Commands", "",
        "Every run, as executed (from the repository root), with its wall time; its folder "
        "holds `command.txt`, `log.txt`, `done.json` and `out/`.", "", "<details>", "",
        "```"]
  for r, d in dones:
    p.append(f"# {r.name}: {fmt_seconds(d['wall_s'])}, finished {d.get('finished')}")
    p.append(d["command"])
  p += ["```", "", "</details>", ""]
  missing = [x["name"] for ln in lines for x in ln["missing"]]
  if missing:
    p += ["## Not done yet", "", ", ".join(missing), ""]
  text = "\n".join(p)
  write_text(out, text)
  return text


def _data_text(plan) -> str:
  a = plan.a
  parts = []
  for name, flag in (("train-images", "data"), ("val-images", "val_data"),
                     ("test-images", "test_data"), ("train-videos", "video_data"),
                     ("test-videos", "test_video_data")):
    given = getattr(a, flag)
    if given:
      parts.append(f"{name} `{given}`")
    elif name == "val-images" and a.data:
      parts.append("validation: the last images of --data")
    else:
      n = {"train-images": a.train_images, "val-images": a.val_images,
           "test-images": a.test_images, "train-videos": a.train_videos,
           "test-videos": a.test_videos}[name]
      seed = {"train": 0, "val": 1, "test": 2}[name.split("-")[0]]
      parts.append(f"{name} synthetic ({n}, seed {seed})")
  return "; ".join(parts) + (f"; synthetic style {a.synthetic_style}; videos of "
                             f"{a.video_length} frames, training clips of {a.video_frames}")


def write(plan, out: str) -> str:
  from qsam2_jax import preflight
  preflight.output_file(out, "--report")
  build(plan, out)
  return os.path.abspath(out)
