"""Short text about a model package, from what its ``model.json`` records (no torch): the scores and the
training data. Used by ``meddiffseg models info`` and by the 3D Slicer module's model description.

:func:`score_lines`: one line per scored dataset, best evidence first -- the real-data protocol
(``metrics.protocol``, written by ``bench/evaluate_protocol.py``: mean Dice per organ over the test
patients of each dataset), else held-out numbers (``metrics.evaluation`` cases whose role says UNSEEN,
written by ``bench/record_evaluation.py``), else the trainer's last validation Dice; none when the
package records none. :func:`data_text`: what the package was trained (and validated) on, by dataset
name and case count, never a path.
"""

from __future__ import annotations

from typing import Any


def _dice_text(dice: dict) -> str:
    return ", ".join(f"{name} {value:.2f}" for name, value in dice.items()
                     if isinstance(value, (int, float)) and not isinstance(value, bool))


def score_lines(metrics: Any) -> list[str]:
    """The scores a package records, one short line per dataset (see the module docstring); [] for none."""
    metrics = metrics if isinstance(metrics, dict) else {}
    lines = []
    protocol = metrics.get("protocol")
    results = protocol.get("results") if isinstance(protocol, dict) else None
    for group, result in (results.items() if isinstance(results, dict) else ()):
        per_seed = result.get("per_seed") if isinstance(result, dict) else None
        if not isinstance(per_seed, dict) or not per_seed or str(result.get("role")) != "test":
            continue
        first = next(iter(per_seed.values()))
        organs = first.get("organs") if isinstance(first, dict) else None
        dice = {name: o.get("dice_mean") for name, o in (organs or {}).items() if isinstance(o, dict)}
        if _dice_text(dice):
            lines.append(f"mean Dice on {first.get('cases')} {group} test patients: {_dice_text(dice)}")
    if lines:
        return lines
    evaluation = metrics.get("evaluation")
    for case, result in (evaluation.items() if isinstance(evaluation, dict) else ()):
        if not isinstance(result, dict) or not str(result.get("role", "")).upper().startswith("UNSEEN"):
            continue
        dice = {name: o.get("dice") for name, o in (result.get("organs") or {}).items() if isinstance(o, dict)}
        if _dice_text(dice):
            lines.append(f"Dice on unseen {case}: {_dice_text(dice)}")
    if lines:
        return lines
    validation = metrics.get("validation")
    if isinstance(validation, dict) and isinstance(validation.get("dice"), dict) and _dice_text(validation["dice"]):
        return [f"validation Dice during training: {_dice_text(validation['dice'])}"]
    return []


def _entry_text(entry: Any) -> str:
    if not isinstance(entry, dict):
        return str(entry)
    name = entry.get("name") or entry.get("dataset") or "?"
    cases = entry.get("cases")
    return f"{name} ({len(cases)} cases)" if isinstance(cases, list) and cases else str(name)


def data_text(provenance: Any) -> str:
    """What the package was trained on, e.g. "btcv (12 cases); validation: dcmqi-ct-3slice"; "" when unrecorded."""
    provenance = provenance if isinstance(provenance, dict) else {}
    data = provenance.get("data") or provenance.get("dataset") or provenance.get("trained_on")
    if not data:
        return ""
    if isinstance(data, str):
        return data
    if isinstance(data, dict):
        parts = []
        for key, label in (("train", ""), ("validation", "validation: ")):
            entries = data.get(key)
            entries = entries if isinstance(entries, list) else ([entries] if entries else [])
            if entries:
                parts.append(label + ", ".join(_entry_text(e) for e in entries))
        return "; ".join(parts)
    if isinstance(data, list):
        return ", ".join(_entry_text(e) for e in data)
    return str(data)


def method_summaries() -> dict[str, str]:
    """``{method name: its one-line summary}`` of the library's methods, sorted by name.

    Read from the source of ``MedDiffSegLib/methods/`` (the string literals ``name`` and ``summary`` of
    each ``@register_method`` class) without importing it: the methods import torch, and ``meddiffseg
    train --help`` and the 3D Slicer module's model list run without it.
    """
    import ast
    from pathlib import Path

    found: dict[str, str] = {}
    for path in sorted((Path(__file__).resolve().parents[1] / "methods").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if not isinstance(node, ast.ClassDef) or not any(
                    isinstance(d, ast.Name) and d.id == "register_method" for d in node.decorator_list):
                continue
            values = {t.id: stmt.value.value for stmt in node.body if isinstance(stmt, ast.Assign)
                      and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)
                      for t in stmt.targets if isinstance(t, ast.Name)}
            if values.get("name"):
                found[values["name"]] = values.get("summary", "")
    return dict(sorted(found.items()))
