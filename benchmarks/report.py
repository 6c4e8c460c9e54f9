"""What every benchmark script does last: its results saved as JSON and a markdown table (each written
atomically) and the table printed; and its ``main`` run so that Ctrl-C prints "interrupted" and exits 130."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def save(folder: Path, stem: str, data: dict[str, Any], table: str) -> None:
    """``folder/stem.json`` and ``folder/stem.md``, then the table on stdout."""
    from hawqc.fileio import write_atomic

    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / f"{stem}.json", json.dumps(data, indent=2) + "\n")
    write_atomic(folder / f"{stem}.md", table)
    print(table, end="")


def run(main: Callable[[], None]) -> None:
    """``main()``; Ctrl-C: "interrupted" on stderr, exit status 130."""
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
