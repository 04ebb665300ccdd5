"""The loss comparison over seeds: a method's row is the mean of its seeds, with their spread and the 95 %
t-interval of the mean, and the best method is named with the methods inside its noise."""

from __future__ import annotations

import math

import pytest

from tokenbridge.reporting.comparison import across_seeds, render_comparison

T_975_2DF = 4.302652729749462  # Student's t, 97.5th percentile, 2 degrees of freedom


def _run(bpb: float) -> dict:
    return {"bits_per_byte": bpb, "bits_per_byte_low": bpb - 0.01, "bits_per_byte_high": bpb + 0.01,
            "bpb_bytes": 900, "gsm_exact_match": 0.1, "gsm_exact_match_stderr": 0.1, "gsm_n": 10, "final_loss": bpb}


def test_one_seed_is_its_run_with_its_own_intervals():
    assert across_seeds({7: _run(0.5)}) == {**_run(0.5), "seeds": [7]}


def test_several_seeds_give_the_mean_their_spread_and_the_t_interval_of_the_mean():
    merged = across_seeds({1: _run(0.5), 2: _run(0.6), 3: _run(0.7)})
    assert merged["bits_per_byte"] == pytest.approx(0.6) and merged["final_loss"] == pytest.approx(0.6)
    assert merged["bits_per_byte_seed_sd"] == pytest.approx(0.1)
    half = T_975_2DF * 0.1 / math.sqrt(3)
    assert (merged["bits_per_byte_low"], merged["bits_per_byte_high"]) == pytest.approx((0.6 - half, 0.6 + half))
    assert merged["gsm_n"] == 10 and isinstance(merged["gsm_n"], int), "a count the runs share stays a count"
    assert merged["gsm_exact_match_seed_sd"] == 0.0 and "gsm_exact_match_stderr" not in merged
    assert merged["seeds"] == [1, 2, 3]


def test_the_table_shows_means_with_spread_and_the_best_method_names_those_inside_its_noise(tmp_path):
    methods = {"alm": across_seeds({1: _run(0.50), 2: _run(0.52), 3: _run(0.54)}),
               "sft": across_seeds({1: _run(0.51), 2: _run(0.53), 3: _run(0.55)}),
               "uld": across_seeds({1: _run(0.80), 2: _run(0.81), 3: _run(0.82)})}
    render_comparison(methods, {"teacher": _run(0.4)}, {"seeds": [1, 2, 3]}, tmp_path, "cmp")
    text = (tmp_path / "cmp.md").read_text()
    assert "each trained with the same data, steps and seeds" in text
    assert "Best bits_per_byte: alm (0.5200; inside each other's 95 % intervals with sft)." in text
    assert "| alm | 0.5200 [0.4703, 0.5697] sd 0.0200 |" in text
