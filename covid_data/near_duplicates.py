"""The one near-duplicate matcher: perceptual hashes (64-bit pHash) within a number of bits.

``duplicate_groups`` groups copies and near copies (bounded, so that a pHash chain does not merge
half a dataset) for the split, so that a group never spans two splits; ``near_pairs`` finds every
pair within ``max_distance`` bits inside one set of hashes; ``nearest`` finds, for each hash of
one set, its closest match in another (external evaluation leaves out images the model has
seen). All rest on the same banded search, so they find exactly the pairs an all-pairs
comparison would.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


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


def _components(n: int, edges_a: list[np.ndarray], edges_b: list[np.ndarray]) -> np.ndarray:
    """Connected components; each row's label is the smallest row index of its component."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a = np.concatenate(edges_a) if edges_a else np.empty(0, dtype=np.int64)
    b = np.concatenate(edges_b) if edges_b else np.empty(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    smallest = np.full(labels.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(smallest, labels, np.arange(n))
    return smallest[labels]


def _group(
    members: np.ndarray, first_sha: np.ndarray, h: np.ndarray, has: np.ndarray, max_distance: int, chunk: int
) -> np.ndarray:
    """Groups among ``members`` (ascending row indices, closed under equal sha256): for each, the
    smallest row index of its group."""
    n = len(members)
    local = np.arange(n)
    edges_a, edges_b = [local], [np.searchsorted(members, first_sha[members])]
    if max_distance > 0 and n > 1:
        mh, mhas = h[members], has[members]
        with_hash = local[mhas]
        uniq, inverse = np.unique(mh[mhas], return_inverse=True)
        rep = np.full(len(uniq), n, dtype=np.int64)
        np.minimum.at(rep, inverse, with_hash)
        edges_a.append(with_hash)  # equal pHashes: distance 0
        edges_b.append(rep[inverse])
        pending = 0
        for ua, ub in near_pairs(uniq, max_distance, chunk):
            edges_a.append(rep[ua])
            edges_b.append(rep[ub])
            pending += len(ua)
            if pending > 4_000_000:  # fold the pairs into components: memory stays O(n)
                labels = _components(n, edges_a, edges_b)
                edges_a, edges_b, pending = [local], [labels], 0
    return members[_components(n, edges_a, edges_b)]


def duplicate_groups(
    sha256: pd.Series,
    phash: pd.Series,
    max_distance: int,
    chunk: int = 512,
    *,
    max_group: int | None = None,
) -> np.ndarray:
    """Group id per row (the smallest row index of its group): rows with equal sha256 or
    pHashes within ``max_distance`` bits share one.

    pHash closeness chains transitively, so a group larger than ``max_group`` is regrouped
    with the distance tightened one bit at a time until every part is within the bound; at 0
    bits only exact copies (sha256) stay together, so a bound is always met short of that
    many copies of one file. Each such group is named in a warning."""
    n = len(sha256)
    rows = np.arange(n)
    # Exact copies: every row joins the first row with its sha256 (rows without one stand alone).
    codes, _ = pd.factorize(pd.Series(sha256).reset_index(drop=True))
    first_sha = np.where(codes >= 0, pd.Series(rows).groupby(codes).transform("min").to_numpy(), rows)
    if max_distance > 0:
        h, has = phash_ints(pd.Series(phash).reset_index(drop=True))
    else:
        h, has = np.zeros(n, dtype=np.uint64), np.zeros(n, dtype=bool)
    groups = _group(rows, first_sha, h, has, max_distance, chunk)
    sizes = np.bincount(groups, minlength=n)
    largest = int(sizes.max()) if n else 0
    if max_group is None or largest <= max_group:
        log.info("largest duplicate group: %d images", largest)
        return groups

    def bounded(members: np.ndarray, distance: int) -> np.ndarray:
        sub = _group(members, first_sha, h, has, distance, chunk)
        ids, counts = np.unique(sub, return_counts=True)
        for gid in ids[counts > max_group] if distance > 0 else ():
            part = sub == gid
            sub[part] = bounded(members[part], distance - 1)
        return sub

    for g in np.flatnonzero(sizes > max_group):
        members = np.flatnonzero(groups == g)
        parts = bounded(members, max_distance - 1)
        groups[members] = parts
        log.warning(
            "a near-duplicate group of %d images (over the bound of %d) is a pHash chain, not copies of one "
            "image: regrouped at tighter distances into %d groups of at most %d images",
            len(members),
            max_group,
            len(np.unique(parts)),
            int(np.unique(parts, return_counts=True)[1].max()),
        )
    log.info(
        "largest duplicate group: %d images (%d before the bound of %d)",
        int(np.bincount(groups, minlength=n).max()),
        largest,
        max_group,
    )
    return groups


# -- assignment --------------------------------------------------------------------------------
