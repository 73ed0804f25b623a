"""Where every benchmark's result goes: the markdown table on stdout, optionally into a file
(--out) and, with the rows and the environment, into JSON (--json)."""

from __future__ import annotations

import json
from typing import Any, Dict, Optional


def emit(table: str, record: Dict[str, Any], out: Optional[str] = None,
         json_path: Optional[str] = None, append: bool = False) -> None:
  """Prints `table`; writes it to `out` (appended after a blank line with `append`) and
  `record` (env, command, rows, ...) to `json_path`."""
  print(table)
  if out:
    with open(out, "a" if append else "w") as f:
      f.write(("\n" if append else "") + table + "\n")
  if json_path:
    with open(json_path, "w") as f:
      json.dump(record, f, indent=1)
