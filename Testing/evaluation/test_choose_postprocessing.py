"""bench/choose_postprocessing.py: nnU-Net's rule for keeping the largest component, per organ."""

from __future__ import annotations

import math

from benchtools import load_bench


def test_keep_only_where_it_helps_and_never_costs_dice():
    choose = load_bench("choose_postprocessing").choose
    per_case = {
        "a": {"liver": {"dice_raw": 0.90, "dice_lc": 0.92, "hd95_raw": 40.0, "hd95_lc": 5.0},
              "pancreas": {"dice_raw": 0.60, "dice_lc": 0.50, "hd95_raw": 30.0, "hd95_lc": 8.0},
              "spleen": {"dice_raw": 0.95, "dice_lc": 0.95, "hd95_raw": 3.0, "hd95_lc": 3.0},
              "aorta": {"dice_raw": 0.80, "dice_lc": 0.80, "hd95_raw": math.inf, "hd95_lc": 6.0}},
        "b": {"liver": {"dice_raw": 0.94, "dice_lc": 0.94, "hd95_raw": 4.0, "hd95_lc": 4.0},
              "pancreas": {"dice_raw": 0.70, "dice_lc": 0.70, "hd95_raw": 9.0, "hd95_lc": 9.0},
              "spleen": {"dice_raw": 0.96, "dice_lc": 0.96, "hd95_raw": 2.0, "hd95_lc": 2.0},
              "aorta": {"dice_raw": 0.85, "dice_lc": 0.85, "hd95_raw": 5.0, "hd95_lc": 5.0}},
    }
    out = choose(per_case, ["liver", "pancreas", "spleen", "aorta", "kidney_left"])
    assert out["liver"]["keep_largest_component"]  # more Dice
    assert not out["pancreas"]["keep_largest_component"]  # less Dice, whatever HD95 gains
    assert not out["spleen"]["keep_largest_component"]  # no change: keep the raw result
    assert out["aorta"]["keep_largest_component"]  # same Dice, a far island gone (inf HD95 -> finite)
    assert "kidney_left" not in out and out["liver"]["n"] == 2
