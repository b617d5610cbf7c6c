"""The lengths a bundle serves, chosen from the cells it will see.

A cell runs at the shortest length of the ladder that holds its tokens, and a transformer
layer costs about L (8 d^2 + 4 d d_hid) + 4 L^2 d multiply-adds at length L: most cells are
far shorter than max_seq_len, so a few well-placed shorter lengths save most of the work. One
graph per precision serves every length (bundle format 2), so a length costs nothing on disk;
MAX_LENGTHS bounds the validation time at export. Where no cells are known (an imported
checkpoint without data) the ladder halves down from max_seq_len: every cell then runs at
less than about twice its own length.
"""

from __future__ import annotations

import numpy as np

MAX_LENGTHS = 5  # lengths of a ladder, max_seq_len included
STEP = 32  # candidate lengths are multiples of this (and max_seq_len itself)


def layer_cost(length: np.ndarray, d_model: int, d_hid: int) -> np.ndarray:
    """Multiply-adds of one transformer layer for one cell at each length."""
    length = np.asarray(length, dtype=np.float64)
    return length * (8 * d_model**2 + 4 * d_model * d_hid) + 4 * length**2 * d_model


def halving_ladder(max_seq_len: int, max_lengths: int = MAX_LENGTHS) -> list[int]:
    """max_seq_len, then halves of it rounded up to STEP, at most `max_lengths` lengths."""
    ladder = [max_seq_len]
    while len(ladder) < max_lengths and ladder[-1] > 2 * STEP:
        ladder.append(-(-ladder[-1] // 2 // STEP) * STEP)
    return sorted(set(ladder))


def choose_ladder(
    n_tokens: np.ndarray, max_seq_len: int, d_model: int, d_hid: int, max_lengths: int = MAX_LENGTHS
) -> list[int]:
    """At most `max_lengths` lengths, the longest `max_seq_len`, that minimise the total cost
    of serving cells with these token counts (<cls> included); dynamic programming over the
    candidate lengths."""
    n_tokens = np.sort(np.minimum(np.asarray(n_tokens, dtype=np.int64), max_seq_len))
    candidates = sorted({*range(STEP, max_seq_len, STEP), max_seq_len})
    if not len(n_tokens) or max_lengths <= 1:
        return [max_seq_len]
    cost = layer_cost(np.array(candidates), d_model, d_hid)
    # upto[i]: cells with at most candidates[i] tokens
    upto = np.searchsorted(n_tokens, candidates, side="right")
    c = len(candidates)
    # best[j][i]: least cost of the cells up to candidates[i] with j + 1 lengths, the last i
    best = np.full((max_lengths, c), np.inf)
    back = np.zeros((max_lengths, c), dtype=np.int64)
    best[0] = upto * cost
    for j in range(1, max_lengths):
        for i in range(c):
            prev = best[j - 1, :i] + (upto[i] - upto[:i]) * cost[i]  # cells of (prev, i]
            if len(prev):
                back[j, i] = int(np.argmin(prev))
                best[j, i] = prev[back[j, i]]
    j = int(np.argmin(best[:, -1]))
    ladder, i = [], c - 1
    while True:
        ladder.append(candidates[i])
        if j == 0:
            break
        i, j = back[j, i], j - 1
    return sorted(set(ladder))
