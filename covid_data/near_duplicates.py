"""The one near-duplicate matcher: perceptual hashes (64-bit pHash) within a number of bits.

``near_pairs`` finds every pair within ``max_distance`` bits inside one set of hashes (the split
groups copies and near copies so that a group never spans two splits); ``nearest`` finds, for
each hash of one set, its closest match in another (external evaluation leaves out images the
model has seen). Both rest on the same banded search, so both find exactly the pairs that an
all-pairs comparison would.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd


def phash_ints(phash: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit hashes, mask of rows that have one)."""
    has = phash.notna().to_numpy()
    h = np.zeros(len(phash), dtype=np.uint64)
    h[has] = np.array([int(x, 16) for x in phash[has]], dtype=np.uint64)
    return h, has


def near_pairs(h: np.ndarray, max_distance: int, chunk: int = 512) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Index pairs of *distinct* hashes within ``max_distance`` bits, in bounded blocks.

    Pigeonhole: split the 64 bits into d+1 bands; two hashes within d bits agree exactly on
    at least one band. So only hashes sharing a band value are compared, found by sorting
    each band: memory O(n), time O(n log n + candidate pairs) instead of O(n^2)."""
    n = len(h)
    bands = max_distance + 1
    if bands > 16:  # bands under 4 bits bucket nothing: plain all-pairs, O(chunk * n) memory
        for start in range(0, n, chunk):
            block = h[start : start + chunk]
            rows, cols = np.nonzero(np.bitwise_count(block[:, None] ^ h[None, start:]) <= max_distance)
            keep = cols > rows
            yield rows[keep] + start, cols[keep] + start
        return
    shift = 0
    for b in range(bands):
        width = 64 // bands + (1 if b < 64 % bands else 0)
        key = (h >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        shift += width
        order = np.argsort(key, kind="stable")
        sk = key[order]
        # Compare each sorted position with the one t places on, while both share the band:
        # the candidate set only shrinks as t grows, so the total work is the number of pairs.
        idx = np.arange(n - 1)
        t = 1
        while idx.size:
            idx = idx[idx + t < n]
            idx = idx[sk[idx] == sk[idx + t]]
            if not idx.size:
                break
            a, c = order[idx], order[idx + t]
            close = np.bitwise_count(h[a] ^ h[c]) <= max_distance
            yield a[close], c[close]
            t += 1


def nearest(
    query: np.ndarray, ref: np.ndarray, max_distance: int, ranks: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(index into ``ref`` or -1, distance in bits or -1) for each hash of ``query``: the closest
    hash of ``ref`` within ``max_distance`` bits, ties broken by the smaller ``ranks`` value, then
    the earlier row of ``ref``."""
    query, ref = np.asarray(query, dtype=np.uint64), np.asarray(ref, dtype=np.uint64)
    ranks = np.zeros(len(ref), dtype=np.int64) if ranks is None else np.asarray(ranks, dtype=np.int64)
    best, dist = np.full(len(query), -1, dtype=np.int64), np.full(len(query), -1, dtype=np.int64)
    if not len(query) or not len(ref):
        return best, dist
    uniq, inverse = np.unique(np.concatenate([ref, query]), return_inverse=True)
    pairs_a, pairs_b = [np.arange(len(uniq))], [np.arange(len(uniq))]  # each value with itself
    if max_distance > 0:
        for a, b in near_pairs(uniq, max_distance):
            pairs_a += [a, b]
            pairs_b += [b, a]
    pairs = pd.DataFrame({"q": np.concatenate(pairs_a), "r": np.concatenate(pairs_b)})
    qs = pd.DataFrame({"q": inverse[len(ref) :], "qi": np.arange(len(query))})
    rs = pd.DataFrame({"r": inverse[: len(ref)], "ri": np.arange(len(ref))})
    m = pairs.merge(qs, on="q").merge(rs, on="r")
    if m.empty:
        return best, dist
    m["d"] = np.bitwise_count(uniq[m["q"].to_numpy()] ^ uniq[m["r"].to_numpy()]).astype(np.int64)
    m["rank"] = ranks[m["ri"].to_numpy()]
    top = m.sort_values(["qi", "d", "rank", "ri"], kind="stable").drop_duplicates("qi")
    best[top["qi"].to_numpy()] = top["ri"].to_numpy()
    dist[top["qi"].to_numpy()] = top["d"].to_numpy()
    return best, dist
