"""Connected components of a duplicate-pair graph: every node points to its component's smallest id.

Two implementations with one contract (``(src, dst)`` edges of ids in, ``(id, _root)`` rows out for every
node that is not its component's root; root = the smallest id as Arrow sorts them: numbers numerically,
strings by code point):

* :func:`components_local` -- all edges in one Arrow table, one process: ids are dictionary-encoded in
  sort order, then ``scipy.sparse.csgraph.connected_components`` (a C BFS over a CSR matrix, O(V + E),
  ~24 bytes/edge of work space) labels the components and a ``np.minimum.at`` picks each component's
  smallest code. Measured on 2M random edges over 3M ids (CPU seconds, both including the id
  encoding): 2.3-3.0 s vs 6.9-7.2 s for the numpy label propagation it replaced (rounds of
  ``np.minimum.at`` + pointer jumping).
* :func:`large_star` / :func:`small_star` -- one round of the distributed large-star / small-star
  algorithm (Kiveris et al., "Connected Components in MapReduce and Beyond", SoCC 2014; the recipe of
  text-dedup's Spark script) over one hash partition of the edge list keyed on ``u``. The driver
  (``polyko.data.dedup``) shuffles between the steps and iterates to a fixed point: O(log n) rounds.

Run on a CPU: ``python -m pytest -q tests/test_dedup.py -k components``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def np_col(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return col.to_numpy(zero_copy_only=False) if isinstance(col, pa.Array) else col.to_numpy()


def encode(arr: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Dense codes that preserve Arrow's order of the values (works for strings and ints alike)."""
    uniq = pc.unique(arr)
    uniq = uniq.take(pc.array_sort_indices(uniq))
    return np_col(pc.index_in(arr, value_set=uniq)).astype(np.int64), uniq


def run_starts(*keys: np.ndarray) -> np.ndarray:
    """Bool mask: row starts a new run of equal keys (rows already sorted by keys)."""
    n = len(keys[0])
    new = np.zeros(n, dtype=bool)
    if n:
        new[0] = True
        for k in keys:
            new[1:] |= k[1:] != k[:-1]
    return new


def components_local(block: pa.Table) -> pa.Table:
    """All edges (``src``, ``dst``) in one table -> (id, _root) for every non-root node."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if block.num_rows == 0:
        return pa.table({"id": block["src"], "_root": block["dst"]})
    both = pa.concat_arrays([block["src"].combine_chunks(), block["dst"].combine_chunks()])
    codes, uniq = encode(both)
    n = len(uniq)
    u, v = codes[: block.num_rows], codes[block.num_rows:]
    graph = coo_matrix((np.ones(len(u), np.int8), (u, v)), shape=(n, n)).tocsr()
    _, label = connected_components(graph, directed=False)
    # codes follow the id order, so a component's root is its smallest code
    root = np.full(label.max() + 1, n, dtype=np.int64)
    np.minimum.at(root, label, np.arange(n, dtype=np.int64))
    root_of = root[label]
    nonroot = np.flatnonzero(root_of != np.arange(n))
    return pa.table({"id": uniq.take(pa.array(nonroot)), "_root": uniq.take(pa.array(root_of[nonroot]))})


def large_star_in(block: pa.Table) -> pa.Table:
    # both directions: node u sees all its neighbours
    u, v = block["u"].combine_chunks(), block["v"].combine_chunks()
    return pa.table({"u": pa.concat_arrays([u, v]), "v": pa.concat_arrays([v, u])})


def small_star_in(block: pa.Table) -> pa.Table:
    # orient every edge from the larger endpoint to the smaller one; keep the large-star change flag
    larger = pc.greater(block["u"], block["v"])
    return pa.table({"u": pc.if_else(larger, block["u"], block["v"]),
                     "v": pc.if_else(larger, block["v"], block["u"]), "_chg": block["_chg"]})


def star_step(block: pa.Table, large: bool) -> pa.Table:
    """Large-star: node x with neighbours N, m = min(N + x): emit (n, m) for n in N, n > x.
    Small-star (edges oriented larger->smaller): emit (n, m) for n in N + x, n != m.
    ``_chg`` marks emissions that differ from the edge they came from (large-star: m != x; small-star:
    the group had more than one neighbour or received a changed edge), so a round whose small-star
    output has no flag left is a fixed point of both operations: the edges are stars around each
    component's smallest id."""
    if block.num_rows == 0:
        return pa.table({"u": block["u"].slice(0, 0), "v": block["v"].slice(0, 0), "_chg": pa.array([], pa.int8())})
    both = pa.concat_arrays([block["u"].combine_chunks(), block["v"].combine_chunks()])
    codes, uniq = encode(both)
    x, n = codes[: block.num_rows], codes[block.num_rows:]
    inchg = np_col(block["_chg"]).astype(bool) if "_chg" in block.column_names else np.zeros(len(x), bool)
    order = np.lexsort((n, x))
    x, n, inchg = x[order], n[order], inchg[order]
    keep = run_starts(x, n)  # drop duplicate (x, n), OR-ing their flags into the first copy
    inchg = np.bitwise_or.reduceat(inchg, np.flatnonzero(keep)) if len(x) else inchg
    x, n = x[keep], n[keep]
    new = run_starts(x)
    cuts = np.flatnonzero(new)
    group = np.cumsum(new) - 1
    m = np.minimum(np.minimum.reduceat(n, cuts), x[cuts])[group]
    if large:
        sel = n > x
        out_u, out_v, chg = n[sel], m[sel], (m[sel] != x[sel])
    else:
        gsize = np.diff(np.r_[cuts, len(x)])
        gchg = (gsize > 1) | np.bitwise_or.reduceat(inchg, cuts)
        nodes_u = np.concatenate([n, x[cuts]])
        nodes_m = np.concatenate([m, m[cuts]])
        sel = nodes_u != nodes_m
        out_u, out_v = nodes_u[sel], nodes_m[sel]
        chg = np.concatenate([gchg[group], gchg])[sel]
    return pa.table({"u": uniq.take(pa.array(out_u)), "v": uniq.take(pa.array(out_v)),
                     "_chg": pa.array(chg.astype(np.int8))})


def large_star(block: pa.Table) -> pa.Table:
    return star_step(block, large=True)


def small_star(block: pa.Table) -> pa.Table:
    return star_step(block, large=False)


