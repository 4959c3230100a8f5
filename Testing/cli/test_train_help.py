"""``meddiffseg train --help`` lists the methods, one line each, read from their source without importing torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from MedDiffSegLib.registry.card import method_summaries
from tinymodels import builtin_methods

REPO = Path(__file__).resolve().parents[2]


def test_method_summaries_are_read_without_importing_the_methods():
    from MedDiffSegLib.methods.base import _METHODS

    summaries = method_summaries()
    assert list(summaries) == builtin_methods()
    assert all(summaries[n] == _METHODS[n].summary and 0 < len(summaries[n]) <= 70 for n in summaries)


def test_train_help_lists_every_method_on_one_line_without_torch():
    code = ("import sys\nfrom MedDiffSegLib.cli.main import main\nrc = main(['train', '--help'])\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch', rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    out = done.stdout
    assert out.rstrip().endswith("no torch 0"), done.stderr
    section = out.split("methods (--method M")[1].split("\n\n")[0].splitlines()[1:]
    assert [line.split()[0] for line in section] == builtin_methods()
    for line, (name, summary) in zip(section, method_summaries().items()):
        assert line.split(None, 1) == [name, summary] and len(line) <= 80
