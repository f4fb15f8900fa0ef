"""Weighted 1-D k-means for every row of a matrix at once: SqueezeLLM's non-uniform quantizer.

The reference (SqueezeAILab/SqueezeLLM, quantization/nuq.py) runs scikit-learn's KMeans (k-means++
initialisation, max_iter=50) once per output row, with the Fisher diagonal as sample weights. Here
all rows run together in torch, deterministically: each row is sorted once, and in one dimension a
cluster is a run of consecutive sorted values between the midpoints of neighbouring centroids, so a
Lloyd step is a `searchsorted` of k - 1 midpoints plus differences of prefix sums (float64), O(k log n)
a row instead of O(k n). Seeds: greedy weighted k-means++ as scikit-learn's, with stratified instead
of random draws (`_greedy_seeds`). An empty cluster is moved onto the value of largest weighted
squared error, as scikit-learn relocates them.
"""

from __future__ import annotations

import math

import torch

_GOLDEN = (math.sqrt(5) - 1) / 2
_CHUNK_ELEMENTS = 2**22  # rows per chunk: its ~10 [rows, n] 8-byte work tensors stay near 320 MiB


def weighted_kmeans_rows(
    values: torch.Tensor,
    weights: torch.Tensor,
    k: int,
    iterations: int = 50,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [rows, k] fp32 ascending, assignment [rows, n] int64: each value's nearest centroid,
    ties to the lower) of Fisher-weighted k-means on each row of `values` ([rows, n]); `weights` >= 0,
    `valid` False where a value takes no part (its assignment is still its nearest centroid).

    A row with at most k distinct valid values gets exactly those values (the last repeated), so
    quantizing it is lossless. A row whose valid weights sum to 0 is clustered unweighted, as the
    reference does; a cluster whose points all weigh 0 takes their unweighted mean."""
    rows, n = values.shape
    valid = torch.ones_like(values, dtype=torch.bool) if valid is None else valid
    centroids = torch.empty(rows, k, dtype=torch.float32, device=values.device)
    step = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, rows, step):
        part = slice(start, start + step)
        centroids[part] = _kmeans_chunk(values[part], weights[part], valid[part], k, iterations)
    return centroids, nearest(values, centroids)


def nearest(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of each value's nearest centroid in its row (centroids ascending; ties to the lower)."""
    midpoints = (centroids[:, 1:] + centroids[:, :-1]) / 2
    return torch.searchsorted(midpoints.contiguous(), values.to(centroids.dtype).contiguous())


def _kmeans_chunk(values: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor, k: int, iterations: int) -> torch.Tensor:
    rows, n = values.shape
    # sort each row once (stable: the same sums on every run); invalid values go last as +inf
    sorted_values, order = torch.where(valid, values.float(), torch.inf).sort(dim=1, stable=True)
    present = valid.gather(1, order)
    valid_count = present.sum(1, keepdim=True)  # the valid values are sorted positions [0, valid_count)
    finite = torch.where(present, sorted_values, 0.0).double()
    weight = torch.where(present, weights.gather(1, order).clamp_min(0), 0.0).double()
    weight = torch.where(weight.sum(1, keepdim=True) == 0, present.double(), weight)  # no weight at all: unweighted

    # prefix sums [rows, n + 1, 4] of (w, w v, v, w v^2), leading 0: a run [a, b) sums to P[b] - P[a]; the
    # four side by side so that looking a run up touches one cache line, not four
    sums = torch.stack([weight, weight * finite, finite, weight * finite.square()], dim=2).cumsum(1)
    sums = torch.nn.functional.pad(sums, (0, 0, 1, 0))

    centroids = _greedy_seeds(sorted_values, finite, weight, present, valid_count, sums, k)

    for _ in range(iterations):
        midpoints = ((centroids[:, 1:] + centroids[:, :-1]) / 2).float()
        edges = torch.cat([torch.zeros_like(valid_count), torch.searchsorted(sorted_values, midpoints, right=True),
                           valid_count], dim=1)  # cluster j holds sorted positions [edges_j, edges_j+1)
        w, wv, v, _ = _run_sums(sums, edges).unbind(2)
        c = edges.diff(dim=1).double()  # how many values
        updated = torch.where(w > 0, wv / w.clamp_min(1e-300), torch.where(c > 0, v / c.clamp_min(1), centroids))
        updated, moved = updated.sort(dim=1)  # means of ordered runs are ordered, up to rounding
        empty = ((c == 0) & (valid_count > 0)).gather(1, moved)
        if empty.any():
            updated = _relocate(updated, empty, sorted_values, finite, weight, present).sort(dim=1).values
        if torch.equal(updated, centroids):
            break
        centroids = updated

    # exactness: a row with at most k distinct values gets exactly them (the last one repeated)
    first = present.clone()  # the first of each run of equal sorted values
    first[:, 1:] &= sorted_values[:, 1:] != sorted_values[:, :-1]
    distinct = first.sum(1, keepdim=True)
    rank = first.cumsum(1) - 1
    exact = torch.zeros(rows, k + 1, dtype=torch.float64, device=values.device)  # column k: a sink for the rest
    exact.scatter_(1, torch.where(first & (rank < k), rank, k), finite)
    exact = exact[:, :k]
    last = exact.gather(1, (distinct - 1).clamp(0, k - 1))
    exact = torch.where(torch.arange(k, device=values.device) < distinct, exact, last)
    return torch.where(distinct <= k, exact, centroids).float()


def _greedy_seeds(sorted_values: torch.Tensor, finite: torch.Tensor, weight: torch.Tensor, present: torch.Tensor,
                  valid_count: torch.Tensor, sums: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy weighted k-means++ seeds, ascending [rows, k], as scikit-learn seeds (2 + log k candidates
    a step, in proportion to w (v - nearest seed)^2, the one that lowers the total the most joins),
    but deterministic: the candidates sit at stratified points (i + offset) / trials of that score's
    cumulative sum, the offset stepping by the golden ratio. Against the exact 1-D optimum, Lloyd from
    these ends ~1.02-1.1x above it; from weighted quantiles 2-10x on spiky Fisher weights, from the
    top-scoring values (farthest-first) ~1.2-1.3x on heavy-tailed rows, the seeds landing on outliers."""
    rows, n = finite.shape
    trials = min(2 + int(math.log(k)), n)
    last = (valid_count - 1).clamp_min(0)
    seeds = sums[:, -1, 1:2] / sums[:, -1, 0:1].clamp_min(1e-300)  # the weighted mean
    values, weight32 = finite.float(), weight.float()  # the scores only pick candidates: float32 will do
    score = weight32 * (values - seeds.float()).square()  # invalid values weigh 0: never picked
    term, cumulative = torch.empty_like(score), torch.empty_like(finite)
    strata = torch.arange(trials, device=finite.device, dtype=torch.float64)
    for step in range(k - 1):
        torch.cumsum(score, 1, dtype=torch.float64, out=cumulative)  # float64: the same picks on any device
        targets = (strata + (step * _GOLDEN) % 1) / trials * cumulative[:, -1:]
        picks = finite.gather(1, torch.minimum(torch.searchsorted(cumulative, targets, right=True), last))
        candidates = torch.cat([seeds.unsqueeze(1).expand(-1, trials, -1), picks.unsqueeze(2)], dim=2).sort(dim=2).values
        best = _total_error(sorted_values, valid_count, sums, candidates.flatten(1, 2), trials).argmin(1, keepdim=True)
        seeds = candidates[torch.arange(rows, device=finite.device), best.squeeze(1)]
        torch.sub(values, picks.gather(1, best).float(), out=term).square_().mul_(weight32)  # in place: fresh
        torch.minimum(score, term, out=score)  # [rows, n] tensors cost more than the arithmetic on them
    return seeds


def _run_sums(sums: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """[rows, ..., e - 1, 4]: the sums over the runs between consecutive `edges` ([rows, ..., e] sorted positions)."""
    flat = edges.flatten(1).unsqueeze(2).expand(-1, -1, sums.shape[2])
    return sums.gather(1, flat).view(*edges.shape, sums.shape[2]).diff(dim=-2)


def _total_error(sorted_values: torch.Tensor, valid_count: torch.Tensor, sums: torch.Tensor, centroids: torch.Tensor,
                 sets: int) -> torch.Tensor:
    """[rows, sets]: sum of w (v - c)^2, each value to its nearest centroid, for `sets` ascending sets
    of centroids laid side by side in `centroids` [rows, sets * m]; from the prefix sums
    (w, w v, w v^2), so O(m log n) a set, not O(n)."""
    rows = centroids.shape[0]
    c = centroids.view(rows, sets, -1)
    midpoints = ((c[..., 1:] + c[..., :-1]) / 2).float().flatten(1)
    inner = torch.searchsorted(sorted_values, midpoints, right=True).view(rows, sets, -1)
    edges = torch.cat([torch.zeros_like(inner[..., :1]), inner, valid_count.unsqueeze(1).expand(-1, sets, 1)], dim=2)
    w, wv, _, wv2 = _run_sums(sums, edges).unbind(3)
    return (wv2 - 2 * c * wv + c.square() * w).sum(2)


def _relocate(centroids: torch.Tensor, empty: torch.Tensor, sorted_values: torch.Tensor, finite: torch.Tensor,
              weight: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Move each empty cluster's centroid onto a value of largest weighted squared error in its row
    (the first empty to the largest, ...); the caller restores ascending order."""
    rows = empty.any(1).nonzero().squeeze(1)
    c = centroids[rows]
    assigned = c.gather(1, nearest(sorted_values[rows], c.float()))
    error = torch.where(present[rows], weight[rows] * (finite[rows] - assigned).square(), -1.0)
    most = min(int(empty.sum(1).max()), error.shape[1])
    worst = finite[rows].gather(1, error.topk(most, dim=1).indices)  # [r, most], descending error
    slot = (empty[rows].cumsum(1) - 1).clamp(0, most - 1)  # the j-th empty cluster takes the j-th worst value
    c = torch.where(empty[rows], worst.gather(1, slot), c)
    centroids = centroids.clone()
    centroids[rows] = c
    return centroids
