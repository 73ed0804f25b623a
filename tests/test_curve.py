"""eval.curve: the learning-curve table is the metrics file's numbers, per step."""

from __future__ import annotations

import json

from eval import curve


def test_curve_table_from_metrics(tmp_path, capsys):
  logs = tmp_path / "run" / "logs"
  logs.mkdir(parents=True)
  rows = [{"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.5}, {"step": 25, "loss": 1.25},
          {"step": 25, "eval/miou": 0.125}, {"step": 40, "loss": 1.0}]
  (logs / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert curve.main([str(tmp_path / "run"), "--keys", "loss,eval/miou", "--every", "20"]) == 0
  out = capsys.readouterr().out.splitlines()
  body = [line for line in out if line.startswith("| ") and "step" not in line]
  # step 10 is skipped (not a multiple of 20), 25 kept for its evaluation, rows merged per step.
  assert body == ["| 20 | 1.5 | – |", "| 25 | 1.25 | 0.125 |", "| 40 | 1 | – |"]


def test_curve_errors(tmp_path, capsys):
  assert curve.main([str(tmp_path)]) == 2
  assert "no metrics file" in capsys.readouterr().err
  bad = tmp_path / "m.jsonl"
  bad.write_text('{"loss": 1}\n')
  assert curve.main([str(bad)]) == 2
  assert "m.jsonl:1: not a metrics row" in capsys.readouterr().err
