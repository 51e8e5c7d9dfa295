"""Small exact solvers shared by mixed precision and compression (no torch: plain Python)."""
from __future__ import annotations

from typing import Optional


def knapsack(costs: list[float], gains: list[float], need: float, resolution: int = 4000) -> Optional[list[int]]:
    """The items whose ``gains`` (bit operations saved) sum to at least ``need`` at the least total ``costs``
    (predicted loss), exactly up to the discretization of the gains into ``resolution`` steps of their
    total (rounded down, so a solution saves at least what it claims); None if even all items fall short.

    >>> knapsack([5.0, 1.0, 1.0], [10, 6, 6], 11)
    [1, 2]
    """
    total = sum(gains)
    if need > total:
        return None
    if need <= 0:
        return []
    unit = total / resolution
    w = [int(g // unit) for g in gains]
    cap = min(int(-(-need // unit)), sum(w))
    inf = float("inf")
    best = [0.0] + [inf] * cap  # best[c]: least cost of saving at least c units
    keep = [[False] * (cap + 1) for _ in w]
    for i, (c, wi) in enumerate(zip(costs, w)):
        for cc in range(cap, 0, -1):
            prev = best[max(cc - wi, 0)] + c
            if wi > 0 and prev < best[cc]:
                best[cc], keep[i][cc] = prev, True
    if best[cap] == inf:
        return None
    chosen, cc = [], cap
    for i in range(len(w) - 1, -1, -1):
        if keep[i][cc]:
            chosen.append(i)
            cc = max(cc - w[i], 0)
    return sorted(chosen)


def multiple_choice_knapsack(options: list[list[tuple[float, float]]], need: float, resolution: int = 4000) -> Optional[list[int]]:
    """One option per group (``(cost, gain)`` pairs; include a ``(0, 0)`` option to allow "no change") so that
    the gains sum to at least ``need`` at the least total cost: exact up to the discretization of the gains
    into ``resolution`` steps of the largest possible total (rounded down, so a solution saves at least what
    it claims). Returns the chosen option index per group, or None if even the best gains fall short.

    >>> multiple_choice_knapsack([[(0, 0), (1.0, 5), (4.0, 9)], [(0, 0), (2.0, 6)]], 10)
    [1, 1]
    """
    if not options:
        return [] if need <= 0 else None
    total = sum(max(g for _, g in opts) for opts in options)
    if need > total:
        return None
    if need <= 0:
        return [min(range(len(o)), key=lambda j: o[j][0]) for o in options]
    unit = total / resolution
    cap = int(-(-need // unit))
    inf = float("inf")
    best = [0.0] + [inf] * cap
    choice = []
    for opts in options:
        new, pick = [inf] * (cap + 1), [-1] * (cap + 1)
        for j, (c, g) in enumerate(opts):
            w = int(g // unit)
            for cc in range(cap + 1):
                prev = best[max(cc - w, 0)]
                if prev + c < new[cc]:
                    new[cc], pick[cc] = prev + c, j
        best = new
        choice.append(pick)
    if best[cap] == inf:
        return None
    out, cc = [0] * len(options), cap
    for i in range(len(options) - 1, -1, -1):
        j = choice[i][cc]
        out[i] = j
        cc = max(cc - int(options[i][j][1] // unit), 0)
    return out
