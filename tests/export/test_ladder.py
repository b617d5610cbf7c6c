"""The default ladder of lengths: the cheapest set of at most five lengths for the cells."""

from __future__ import annotations

import itertools

import numpy as np

from scgpt_export.ladder import MAX_LENGTHS, STEP, choose_ladder, halving_ladder, layer_cost


def total(ladder: list[int], n_tokens: np.ndarray) -> float:
    ladder = sorted(ladder)
    return float(layer_cost(np.array(ladder)[np.searchsorted(ladder, n_tokens)], 512, 512).sum())


def test_the_ladder_is_the_cheapest_of_all_ladders_of_its_size():
    n_tokens = np.clip(np.random.default_rng(0).lognormal(5.5, 0.7, 3000).astype(int), 2, 1200)
    candidates = [*range(STEP, 1200, STEP)]
    for size in (2, 3):
        ladder = choose_ladder(n_tokens, 1200, 512, 512, max_lengths=size)
        best = min(
            total([*c, 1200], n_tokens) for c in itertools.combinations(candidates, size - 1)
        )
        assert total(ladder, n_tokens) == best
        assert ladder[-1] == 1200
        assert len(ladder) == size


def test_short_cells_get_short_lengths_and_no_more_than_they_need():
    assert choose_ladder(np.array([10, 20, 30, 31]), 256, 64, 128) == [32, 256]
    assert choose_ladder(np.array([]), 256, 64, 128) == [256]
    ladder = choose_ladder(np.full(100, 1200), 1200, 512, 512)
    assert ladder == [1200]  # every cell fills the length: nothing shorter helps
    five = choose_ladder(np.arange(2, 1201), 1200, 512, 512)
    assert len(five) == 5
    assert five[-1] == 1200


def test_without_cells_every_cell_runs_below_twice_its_length():
    assert halving_ladder(1200) == [96, 160, 320, 608, 1200]
    for max_len in (64, 100, 1200, 3001):
        ladder = halving_ladder(max_len)
        assert ladder[-1] == max_len
        assert len(ladder) <= MAX_LENGTHS
        for n in range(ladder[0], max_len + 1):
            assert ladder[np.searchsorted(ladder, n)] < 2 * n + STEP  # STEP: rounding up
