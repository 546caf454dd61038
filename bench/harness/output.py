"""What every phase writes: progress lines on stdout and its JSON part."""

from __future__ import annotations

import json
import time
from pathlib import Path


def log(msg: str) -> None:
    print(f"[bench.py {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_json(path: str | Path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed, so that a reader never sees half a file.
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
