"""Tolerances of float comparisons, derived from the arithmetic instead of one machine's error.

Two computations of the same value that differ only in the order of their float operations (a
batched against a per-item convolution, another thread count, another CPU's vector width) agree
to within the classical bound for summation: adding `terms` numbers of magnitude at most
`magnitude` in any order errs by at most (terms - 1) * eps * terms * magnitude in the worst case,
and by about eps * sqrt(terms) * terms * magnitude for rounding errors that are independent
(Higham, "Accuracy and Stability of Numerical Algorithms", §4.2). The tests use the worst case
for a few terms and the probabilistic one, with a safety factor, for reductions that are too long
for the worst case to say anything.
"""

import math

import torch


def reordering_atol(dtype: torch.dtype, terms: int, magnitude: float, safety: float = 8.0) -> float:
    """Absolute difference allowed between two summation orders of `terms` values whose sum has
    a size of about `magnitude` (the largest value compared)."""
    eps = torch.finfo(dtype).eps
    return safety * eps * math.sqrt(terms) * magnitude


def rounding_rtol(dtype: torch.dtype, roundings: int, safety: float = 2.0) -> float:
    """Relative difference allowed between a value and the same value after `roundings` float
    operations in `dtype` (casts included), each of which errs by at most half an epsilon
    relative to its result (Higham's unit roundoff); `safety` covers the first-order bound's
    neglected terms many times over."""
    return safety * roundings * torch.finfo(dtype).eps / 2
