#!/usr/bin/env python
"""Repository size against the Slicer Extensions Index limit (100 MB): the packed git history and HEAD.

    python bench/repo_size.py

Prints one JSON document: bytes of the packed history (``git count-objects -v``: what a clone
downloads, before a ``git gc`` repack), of the files at HEAD, the five largest files, and whether
each is under the index's 100 MB. Exit 0 either way: a figure, not a test (history cannot be
shrunk by a commit; Testing/slicer checks HEAD).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT = 100 * 1000**2


def main() -> int:
    counts = dict(line.split(": ", 1) for line in subprocess.run(
        ["git", "count-objects", "-v"], cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines())
    history = (int(counts["size-pack"]) + int(counts["size"])) * 1024
    tree = subprocess.run(["git", "ls-tree", "-r", "-l", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.splitlines()
    sizes = sorted(((int(p[3]), p[4]) for p in (line.split(None, 4) for line in tree) if p[3].isdigit()), reverse=True)
    head = sum(s for s, _ in sizes)
    print(json.dumps({"history_bytes": history, "history_under_limit": history < LIMIT, "head_bytes": head,
                      "head_under_limit": head < LIMIT, "limit_bytes": LIMIT,
                      "largest_at_head": [{"path": n, "bytes": s} for s, n in sizes[:5]]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
