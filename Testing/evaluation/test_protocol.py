"""The multi-patient protocol: aggregation with failures apart, the split, and the training configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from MedDiffSegLib.evaluation.protocol import aggregate, markdown_table, seed_spread

REPO = Path(__file__).resolve().parents[2]


def _case(**organs):
    out = []
    for name, (dice, hd, status) in organs.items():
        out.append({"name": name, "dice": dice, "hd95_mm": hd, "assd_mm": hd / 4 if math.isfinite(hd) else hd,
                    "status": status})
    return {"organs": out}


def test_failures_are_counted_apart_and_never_averaged_as_infinity():
    reports = [
        _case(liver=(0.9, 4.0, "ok"), gallbladder=(0.0, math.inf, "missed")),
        _case(liver=(0.8, 6.0, "ok"), gallbladder=(0.5, 10.0, "ok")),
        _case(liver=(0.7, 8.0, "ok"), gallbladder=(0.0, math.inf, "false_positive")),
        _case(liver=(1.0, 0.0, "both_empty"), gallbladder=(1.0, 0.0, "both_empty")),
    ]
    agg = aggregate(reports)
    liver, gb = agg["organs"]["liver"], agg["organs"]["gallbladder"]
    assert liver["n"] == 3 and liver["dice_mean"] == pytest.approx(0.8) and liver["dice_sd"] == pytest.approx(0.1)
    assert liver["hd95_mean"] == pytest.approx(6.0) and liver["hd95_n"] == 3 and liver["absent"] == 1
    # gallbladder: the missed case counts Dice 0; the hallucinated one is not a Dice case; distances only where defined
    assert gb["n"] == 2 and gb["dice_mean"] == pytest.approx(0.25)
    assert gb["hd95_n"] == 1 and gb["hd95_mean"] == pytest.approx(10.0)
    assert gb["missed"] == 1 and gb["hallucinated"] == 1 and agg["failures"] == 2
    assert agg["mean_dice"] == pytest.approx((0.8 + 0.25) / 2) and agg["cases"] == 4
    table = markdown_table(agg)
    assert "| gallbladder | 2 | 0.250 ± 0.354 | 10.0 ± — (1) | 1 | 1 |" in table
    assert "inf" not in table


def test_seed_spread_is_the_sd_of_the_per_seed_means():
    a = aggregate([_case(liver=(0.9, 1.0, "ok"))])
    b = aggregate([_case(liver=(0.7, 1.0, "ok"))])
    s = seed_spread([a, b])
    assert s["organs"]["liver"]["dice_mean_over_seeds"] == pytest.approx(0.8)
    assert s["organs"]["liver"]["dice_sd_over_seeds"] == pytest.approx(math.sqrt(0.02))
    assert s["seeds"] == 2


def test_test_patients_are_never_training_patients():
    protocol = json.loads((REPO / "bench" / "protocol.json").read_text())
    configs = {p.stem: json.loads(p.read_text()) for p in (REPO / "MedDiffSegLib" / "training" / "configs").rglob("*.json")}
    checked = 0
    for key, d in protocol["datasets"].items():
        test = set(d["test"])
        assert len(test) >= 5, f"{key}: at least 5 test patients"
        assert not test & set(d["train"])
        for name, cfg in configs.items():
            for entry in cfg.get("train", []) + cfg.get("validation", []):
                if entry.get("dataset") == d["dataset"]:
                    cases = entry.get("cases")
                    assert cases is not None, f"{name} must list its {key} cases (else it trains on all of them)"
                    assert not test & set(cases), f"{name} trains or tunes on test patients {test & set(cases)}"
                    checked += 1
    assert checked >= 2  # the CT and MR defaults


def test_shipped_real_data_packages_record_the_protocol_split():
    """A shipped package trained on a protocol dataset lists its training cases; none is a test case."""
    protocol = json.loads((REPO / "bench" / "protocol.json").read_text())
    test = {c for d in protocol["datasets"].values() for c in d["test"]}
    seen = 0
    for mj in (REPO / "MedDiffSegLib" / "models").glob("*/model.json"):
        meta = json.loads(mj.read_text())
        for entry in meta.get("provenance", {}).get("data", {}).get("train", []):
            if "cases" in entry:
                assert not test & set(entry["cases"]), f"{mj.parent.name} trained on test patients"
                seen += 1
    assert seen >= 2  # abdomen-ct and abdomen-mr


def test_the_headline_mean_is_over_the_benchmark_organs():
    from MedDiffSegLib.evaluation.protocol import aggregate, markdown_table

    def rep(dice):
        return {"organs": [{"name": n, "dice": d, "status": "ok", "hd95_mm": 1.0, "assd_mm": 1.0} for n, d in dice.items()]}

    reports = [rep({"liver": 0.9, "pancreas": 0.5, "esophagus": 0.1}), rep({"liver": 0.8, "pancreas": 0.7, "esophagus": 0.3})]
    agg = aggregate(reports, benchmark=["liver", "pancreas"])
    assert agg["mean_dice"] == pytest.approx(0.725) and agg["mean_dice_all"] == pytest.approx((0.85 + 0.6 + 0.2) / 3)
    assert "mean over the 2 benchmark organs" in markdown_table(agg) and "mean over all 3 organs" in markdown_table(agg)
    assert aggregate(reports)["mean_dice"] == pytest.approx((0.85 + 0.6 + 0.2) / 3)


def test_held_out_cases_are_the_validation_patients_and_never_test_patients(data_dir):
    from MedDiffSegLib.errors import InputError
    from MedDiffSegLib.evaluation.protocol import held_out_cases

    protocol = json.loads((REPO / "bench" / "protocol.json").read_text())
    config = {"validation": [{"dataset": "btcv/dataset.json", "cases": ["btcv_0005", "btcv_0024"]}]}
    cases = held_out_cases(protocol, config, ["liver", "pancreas", "not_in_btcv"], data_dir)
    assert [c["name"] for c in cases] == ["btcv_0005", "btcv_0024"]
    assert all(c["role"] == "validation" and c["organs"] == ["liver", "pancreas"] and Path(c["image"]).is_file()
               for c in cases)
    assert cases[0]["benchmark"] == protocol["datasets"]["btcv"]["organs"]
    assert [c["name"] for c in held_out_cases(protocol, config, ["liver"], data_dir, only=["btcv_0024"])] == ["btcv_0024"]
    assert held_out_cases(protocol, {}, ["liver"], data_dir) == []
    test_patient = protocol["datasets"]["btcv"]["test"][0]
    with pytest.raises(InputError, match=f"{test_patient} is a test patient"):
        held_out_cases(protocol, {"validation": [{"dataset": "btcv/dataset.json", "cases": [test_patient]}]},
                       ["liver"], data_dir)
