"""The bits-per-byte interval: a bootstrap over test answers that holds the value, narrows with more answers and
is the same for the same scores."""

from __future__ import annotations

import math
import random

from tokenbridge.intervals import bootstrap_interval


def _answers(count: int, seed: int) -> tuple[list[float], list[int]]:
    rng = random.Random(seed)
    n_bytes = [rng.randint(40, 400) for _ in range(count)]
    return [size * rng.uniform(0.2, 0.6) for size in n_bytes], n_bytes


def _bits_per_byte(nats: list[float], n_bytes: list[int]) -> float:
    return math.fsum(nats) / math.log(2) / sum(n_bytes)


def test_the_interval_holds_the_value_and_narrows_with_four_times_the_answers():
    few, many = _answers(32, seed=1), _answers(128, seed=1)
    (low, high), (low_many, high_many) = bootstrap_interval(*few), bootstrap_interval(*many)
    assert low < _bits_per_byte(*few) < high
    assert low_many < _bits_per_byte(*many) < high_many
    assert (high_many - low_many) < 0.7 * (high - low)  # about half: the width goes as 1 / sqrt(n)


def test_identical_answers_give_no_spread_and_the_same_scores_the_same_interval():
    low, high = bootstrap_interval([math.log(2) * 50] * 20, [100] * 20)
    assert math.isclose(low, 0.5) and math.isclose(high, 0.5)
    assert bootstrap_interval(*_answers(32, seed=2)) == bootstrap_interval(*_answers(32, seed=2))
