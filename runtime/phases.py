"""Wall-clock marks of a command's phases, written only when EIGHTGEN_PHASES names a file (for the start-up benchmark)."""

from __future__ import annotations

import json
import os
import time

PHASES = "EIGHTGEN_PHASES"


def mark(name: str) -> None:
    """Append {"phase": name, "time": epoch seconds} to $EIGHTGEN_PHASES, if it is set."""
    path = os.environ.get(PHASES)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"phase": name, "time": time.time()}) + "\n")
