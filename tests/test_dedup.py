"""polyko.data.dedup on a real local Ray cluster and real Korean data.

* exact: the NSMC raw sample (~102k movie reviews, many repeats such as "최고") vs a brute-force count.
* near:  news sentences + their North-Korean-orthography rewrites (``.ko`` line i <-> ``.nk`` line i):
         recall on those pairs, true Jaccard of every removed document vs the one it duplicates.
* determinism across block counts, partition counts, worker counts and both components paths.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest

from polyko.data.dedup import (DedupConfig, MinHasher, deduplicate, exact_canonical, jaccard,
                               optimal_bands, shingles)
from polyko.data.minhash import _CHUNK  # the vectorised path's tile, in shingles

_CACHE: dict = {}


def _load(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def news(corpus_dir):
    rows = _load(corpus_dir / "korean_news_parallel_ko" / "news_ko_and_nk.jsonl")
    for i, r in enumerate(rows):
        r["id"] = f"news-{i:05d}"
    return rows


@pytest.fixture(scope="module")
def news_pairs(news):
    """(ko id, nk id) for each parallel line: korean-english-park.X.ko line i <-> northkorean-english.X.nk line i."""
    by = {(r["source"], r["line"]): r["id"] for r in news}
    pairs = []
    for split in ("dev", "test"):
        for (src, line), i in by.items():
            if src == f"korean-english-park.{split}.ko":
                pairs.append((i, by[(f"northkorean-english.{split}.nk", line)]))
    assert len(pairs) == 3000
    return pairs


def _dataset(rows, blocks):
    import ray.data

    table = pa.Table.from_pylist(rows)
    step = -(-len(rows) // blocks)
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, len(rows), step)])


def _removed(removed_ds):
    return {r["id"]: (r["dup_of"], r["kind"]) for r in removed_ds.take_all()}


def _run(rows, cfg, blocks=4, keys_dir=None):
    kept, removed = deduplicate(_dataset(rows, blocks), cfg, keys_dir=keys_dir)
    return kept, _removed(removed)


def _reference(rows, cfg: DedupConfig) -> dict:
    """Single-process reference of the same algorithm (plain dicts, union-find): what the distributed
    run must reproduce exactly, whatever its blocks, partitions, workers or components path."""
    text = {r["id"]: r["text"] for r in rows}
    groups = defaultdict(list)
    for r in rows:
        groups[exact_canonical(r["text"])].append(r["id"])
    rep_of = {i: min(ids) for ids in groups.values() for i in ids}
    reps = sorted(set(rep_of.values()))
    h = cfg.hasher()
    sig, ok = h.signatures([text[i] for i in reps])
    bands = h.band_hashes(sig)
    buckets = defaultdict(list)
    for k, i in enumerate(reps):
        if ok[k]:
            for band in bands[k]:
                buckets[int(band)].append(k)
    parent = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for members in buckets.values():
        m = min(members)
        for o in members:
            if o == m:
                continue
            if cfg.verify == "minhash":
                sim = float((sig[m] == sig[o]).mean())
            elif cfg.verify == "jaccard":
                sim = jaccard(text[reps[m]], text[reps[o]], cfg.ngram, cfg.ignore_spaces)
            else:
                sim = 1.0
            if sim >= cfg.threshold:
                ra, rb = find(m), find(o)
                parent[max(ra, rb)] = min(ra, rb)
    root = {reps[k]: reps[find(k)] for k in range(len(reps))}
    out = {}
    for i, rep in rep_of.items():
        if i != rep:
            out[i] = (root[rep], "exact")
        elif root[i] != i:
            out[i] = (root[i], "near")
    return out


@pytest.fixture()
def news_default(ray_local, news):
    """Default config on the news file, computed once per module (several tests read it)."""
    if "news_default" not in _CACHE:
        kept, rem = _run(news, DedupConfig(), blocks=4)
        _CACHE["news_default"] = (kept.take_all(), rem)
    return _CACHE["news_default"]


# ------------------------------------------------------------------------------------- no cluster
@pytest.mark.parametrize("threshold,num_perm", [(0.5, 128), (0.8, 128), (0.9, 128), (0.7, 64)])
def test_optimal_bands_minimises_the_s_curve_error(threshold, num_perm):
    """Brute force with scipy's quad (the objective datasketch's _optimal_param minimises)."""
    from scipy.integrate import quad

    def err(b, r):
        fp = quad(lambda s: 1 - (1 - s ** r) ** b, 0.0, threshold)[0]
        fn = quad(lambda s: (1 - s ** r) ** b, threshold, 1.0)[0]
        return 0.5 * fp + 0.5 * fn

    b, r = optimal_bands(threshold, num_perm)
    assert b * r <= num_perm
    best = min(err(bb, rr) for bb in range(1, num_perm + 1) for rr in range(1, num_perm // bb + 1))
    assert err(b, r) <= best + 1e-9


def test_minhash_estimates_jaccard_and_is_batch_independent(news, news_pairs):
    h = DedupConfig().hasher()
    text = {r["id"]: r["text"] for r in news}
    pairs = news_pairs[:400]
    a = [text[i] for i, _ in pairs]
    b = [text[j] for _, j in pairs]
    sa, ok_a = h.signatures(a)
    sb, ok_b = h.signatures(b)
    assert ok_a.all() and ok_b.all()
    est = (sa == sb).mean(axis=1)
    true = np.array([jaccard(x, y) for x, y in zip(a, b)])
    err = est - true
    # unbiased estimator with std sqrt(J(1-J)/128) <= 0.044
    assert abs(err.mean()) < 0.01, err.mean()
    assert np.abs(err).max() < 0.2
    # a document's signature does not depend on its batch or on the process (fresh hasher, same seed)
    one_by_one = np.stack([DedupConfig().hasher().signatures([t])[0][0] for t in a[:20]])
    assert np.array_equal(one_by_one, sa[:20])
    other_seed = MinHasher(num_perm=128, ngram=5, seed=7, bands=9, rows=13)
    assert not np.array_equal(other_seed.signatures(a[:5])[0], sa[:5])
    # short and empty texts
    s, ok = h.signatures(["", "굿", "굿", "최고"])
    assert ok.tolist() == [False, True, True, True]
    assert np.array_equal(s[1], s[2]) and not np.array_equal(s[1], s[3])
    assert shingles("최 고", 5) == {"최고"}


def test_signatures_equal_the_definition_and_a_prefix_of_permutations(news):
    """Each signature entry is min over the text's shingle hashes x of ((a_i x + b_i) mod 2^64) >> 32,
    computed here with Python integers, also for a text whose shingles span several tiles of the
    vectorised path; ``perms=k`` gives the first k columns (the key map computes bands * rows only)."""
    h = MinHasher(num_perm=16, ngram=5, seed=3, bands=3, rows=5)
    long_text = " ".join(r["text"] for r in news[:700])  # more than two tiles: crosses tile boundaries
    texts = [news[0]["text"], "굿", long_text, news[1]["text"]]
    x, counts = h.shingle_hashes(texts)
    assert counts[2] > 2 * _CHUNK
    sig, ok = h.signatures(texts)
    assert ok.all()
    ends = np.cumsum(counts)
    for d in range(len(texts)):
        xs = [int(v) for v in x[ends[d] - counts[d]:ends[d]]]
        for i in range(h.num_perm):
            a, b = int(h.a[i, 0]), int(h.b[i, 0])
            assert sig[d, i] == min(((a * v + b) % (1 << 64)) >> 32 for v in xs), (d, i)
    part, ok_part = h.signatures(texts, perms=15)
    assert np.array_equal(part, sig[:, :15]) and np.array_equal(ok_part, ok)
    assert np.array_equal(h.band_hashes(part), h.band_hashes(sig))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_components_local_and_star_rounds_agree_with_union_find(seed):
    """Both components paths (one-task label propagation; large/small-star rounds, run here on one
    partition) against a plain union-find, on random graphs with self-loops and repeated edges."""
    from polyko.data import components as C

    rng = np.random.default_rng(seed)
    n, e = 400, [200, 380, 700][seed]
    u, v = rng.integers(0, n, e), rng.integers(0, n, e)
    names = [f"doc-{i:04d}" for i in range(n)]
    edges = pa.table({"src": [names[i] for i in u], "dst": [names[i] for i in v]})
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(u, v):
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    expected = {names[i]: names[find(i)] for i in set(u) | set(v) if find(i) != i}

    local = C.components_local(edges)
    assert dict(zip(local["id"].to_pylist(), local["_root"].to_pylist())) == expected
    a = edges.rename_columns(["u", "v"])
    for _ in range(50):
        a = C.small_star(C.small_star_in(C.large_star(C.large_star_in(a))))
        changed = int(np.asarray(a["_chg"]).sum())
        a = a.select(["u", "v"])
        if changed == 0:
            break
    assert changed == 0
    assert dict(zip(a["u"].to_pylist(), a["v"].to_pylist())) == expected


def test_config_errors():
    for bad in (dict(threshold=1.5), dict(ngram=0), dict(verify="maybe"), dict(bands=4),
                dict(bands=20, rows=10), dict(local_max_docs=-1)):
        with pytest.raises(ValueError):
            DedupConfig(**bad)


# ------------------------------------------------------------------------------------ on Ray
def test_exact_dedup_matches_brute_force_on_nsmc(ray_local, corpus_dir):
    rows = []
    for path in sorted((corpus_dir / "nsmc_raw_sample").glob("*.jsonl")):
        rows += _load(path)
    for i, r in enumerate(rows):
        r["id"] = f"nsmc-{i:06d}"
    groups = defaultdict(list)
    for r in rows:
        groups[exact_canonical(r["text"])].append(r["id"])
    expected = {i: min(ids) for ids in groups.values() if len(ids) > 1 for i in ids if i != min(ids)}
    assert len(expected) > 1000  # the sample really is full of repeats ("최고", "굿", ...)

    # local_max_docs=0: the distributed (hash-shuffle) exact path; the news tests run the one-task path
    kept, removed = deduplicate(_dataset(rows, 6), DedupConfig(near=False, local_max_docs=0))
    got = _removed(removed)
    assert {i: d for i, (d, _) in got.items()} == expected
    assert {k for _, k in got.values()} == {"exact"}
    kept_rows = kept.take_all()
    assert len(kept_rows) == len(groups)
    assert {r["id"] for r in kept_rows} == {r["id"] for r in rows} - set(expected)
    # every other column survives unchanged
    by_id = {r["id"]: r for r in rows}
    assert set(kept_rows[0]) == set(rows[0])
    assert all(r == by_id[r["id"]] for r in kept_rows[:2000])
    sources = {r["source"] for r in removed.take(10)}
    assert sources == {"nsmc_raw"}


def test_near_dedup_news_recall_and_precision(news_default, news, news_pairs):
    kept_rows, rem = news_default
    text = {r["id"]: r["text"] for r in news}
    assert len(kept_rows) + len(rem) == len(news)
    assert {r["id"] for r in kept_rows}.isdisjoint(rem)

    def survivor(i):
        return rem[i][0] if i in rem else i

    # recall: a parallel pair counts as caught when both end in the same surviving document
    caught = [survivor(a) == survivor(b) for a, b in news_pairs]
    pair_jac = np.array([jaccard(text[a], text[b]) for a, b in news_pairs])
    recall_all = float(np.mean(caught))
    above = pair_jac >= 0.8
    recall_above = float(np.mean(np.array(caught)[above]))
    # precision: every removed document vs the document it now points to
    near = [(i, d) for i, (d, k) in rem.items() if k == "near"]
    sims = np.array([jaccard(text[i], text[d]) for i, d in near])
    precision = float(np.mean(sims >= 0.7))
    print(f"\nnews: {len(rem)} removed ({len(near)} near), pair recall {recall_all:.3f} overall, "
          f"{recall_above:.3f} on {above.sum()} pairs with true J>=0.8; removed J>=0.7: {precision:.3f}, "
          f"min J {sims.min():.3f}")
    assert recall_above > 0.95
    assert recall_all > 0.6
    assert precision > 0.97
    assert sims.min() > 0.4  # no unrelated sentence removed (unrelated news sentences have J ~ 0)
    # the survivor is the smallest id of its cluster
    assert all(d < i for i, (d, _) in rem.items())
    assert all(d not in rem for d, _ in rem.values())
    # exact copies in the file are reported as exact
    assert any(k == "exact" for _, k in rem.values())
    # the distributed run is exactly the single-process reference
    assert rem == _reference(news, DedupConfig())


def test_threshold_determinism_workers_partitions_and_distributed_components(news_default, news, ray_local):
    """A stricter threshold with true-Jaccard verification, run on reversed input in 7 blocks, 3 shuffle
    partitions, one worker at a time and the distributed (large/small-star) components path: equals the
    single-process reference, and removes fewer near duplicates than the default run."""
    import ray.data
    from ray.data import ExecutionResources

    _, rem = news_default
    text = {r["id"]: r["text"] for r in news}
    cfg = DedupConfig(threshold=0.95, verify="jaccard", num_partitions=3, cc_local_max_edges=0, local_max_docs=0)
    ctx = ray.data.DataContext.get_current()
    old = ctx.execution_options.resource_limits
    ctx.execution_options.resource_limits = ExecutionResources(cpu=1)  # one worker at a time
    try:
        _, strict = _run(news[::-1], cfg, blocks=7)
    finally:
        ctx.execution_options.resource_limits = old
    assert strict == _reference(news, cfg)
    n_near = sum(k == "near" for _, k in rem.values())
    n_strict = sum(k == "near" for _, k in strict.values())
    assert 0 < n_strict < n_near
    # exact removals do not depend on the threshold
    assert {i for i, (_, k) in strict.items() if k == "exact"} == {i for i, (_, k) in rem.items() if k == "exact"}
    # true-Jaccard verification: every near-removed doc is >= 0.95 similar to some member of its cluster
    clusters = defaultdict(list)
    for i, (d, _) in strict.items():
        clusters[d].append(i)
    for i, (d, k) in strict.items():
        if k == "near":
            assert max(jaccard(text[i], text[j]) for j in clusters[d] + [d] if j != i) >= 0.95


def test_bad_input(ray_local):
    import ray.data

    ds = ray.data.from_items([{"id": 1, "body": "x"}])
    with pytest.raises(ValueError, match="text"):
        deduplicate(ds, DedupConfig())
    with pytest.raises(ValueError, match="exact / near"):
        deduplicate(ds, DedupConfig(exact=False, near=False), text_column="body")


def test_repeated_id_is_an_error(ray_local):
    import ray.data

    twice = ray.data.from_items([{"id": 1, "text": "가나다라마"}, {"id": 1, "text": "바사아자차"}])
    with pytest.raises(Exception, match="not unique"):  # one-task path; the ValueError comes wrapped by Ray
        deduplicate(twice, DedupConfig(near=False, local_max_docs=10))


@pytest.mark.parametrize("map_bytes,on_disk,reducers", [(0, False, 3), (16 << 20, False, 3), (16 << 20, True, 3),
                                                         (16 << 20, False, 0)])
def test_split_partitions_many_blocks_equal_reference(ray_local, news, map_bytes, on_disk, reducers, tmp_path):
    """The distributed path with every partition arriving as many small pieces (the input in 96 blocks;
    map_bytes=0: a map task per block, so each of the 16 partitions is 96 pieces; the default groups the
    small blocks into a few map tasks, several blocks per piece) and several partitions per reduce
    block (16 partitions on 3 reducers), through the distributed components too: exactly the
    single-process reference. ``on_disk``: the key table and the representatives as Parquet files
    (``keys_dir``), and the bucket shuffle in rounds of a few bands (``bucket_round_bytes`` far below
    4,500 docs x 9 bands). ``reducers=0``: a reducer per partition, so the component rounds' shuffles
    get 16 blocks each and group them into map tasks too."""
    cfg = DedupConfig(local_max_docs=0, num_partitions=16, reducers=reducers, cc_local_max_edges=0,
                      drop_chunk_rows=300, map_bytes=map_bytes, bucket_round_bytes=200_000 if on_disk else 256 << 20)
    keys_dir = str(tmp_path / "keys") if on_disk else None
    kept, rem = _run(news[:3000] + news[3000:3000 + 1500], cfg, blocks=96, keys_dir=keys_dir)
    if on_disk:   # the key table (a file per block) and the representatives (a file per exact reducer)
        assert len(list((tmp_path / "keys").glob("*.parquet"))) == 96
        assert len(list((tmp_path / "keys" / "representatives").glob("*.parquet"))) == 3
    assert rem == _reference(news[:4500], cfg)
    assert sum(k == "near" for _, k in rem.values()) > 100
    # the range-chunked kept filter (drop_chunk_rows=300: several chunks) drops exactly the removed ids
    kept_ids = {r["id"] for r in kept.take_all()}
    assert kept_ids == {r["id"] for r in news[:4500]} - set(rem)


def test_map_group_keeps_pieces_out_of_the_driver_heap():
    """Blocks per shuffle map task: ~map_bytes at small scale; at 1.2 TB (the exact shuffle of ~6e8
    documents: ~17 GB over ~1,000 partitions, 100k blocks, 64 CPUs) enough that every piece stays above
    Ray's 100 KB inline limit, where map_bytes alone would give 16 KB pieces; never fewer than two
    map tasks per CPU, never a task per block when pieces would be tiny."""
    from polyko.data.dedup import MIN_PIECE_BYTES, map_group

    def piece(blocks, nbytes, parts, g):
        return g * nbytes / blocks / parts

    # the shared corpus at 50x: the exact shuffle moves ~280 MB in 17 partitions: map_bytes decides
    assert map_group(900, 280e6, 17, 2, 16 << 20) == int((16 << 20) * 900 // 280e6)
    blocks, nbytes, cpus = 100_000, 6e8 * 28, 64
    parts = math.ceil(nbytes / (16 << 20))
    old = max(1, int((16 << 20) * blocks // nbytes))
    assert piece(blocks, nbytes, parts, old) < 100e3   # what map_bytes alone gave
    g = map_group(blocks, nbytes, parts, cpus, 16 << 20)
    assert piece(blocks, nbytes, parts, g) >= 100e3 and blocks / g >= 2 * cpus
    # on 16 CPUs the two-tasks-per-CPU floor leaves room: the MIN_PIECE_BYTES target itself binds
    g = map_group(blocks, nbytes, parts, 16, 16 << 20)
    assert MIN_PIECE_BYTES * 0.99 <= piece(blocks, nbytes, parts, g) <= MIN_PIECE_BYTES * 1.01
    # few blocks: one per task; map_bytes=0: one per task
    assert map_group(8, 1e9, 60, 4, 16 << 20) == 1 and map_group(10_000, 1e9, 60, 4, 0) == 1


def test_shuffle_keeps_key_groups_whole(ray_local):
    """Blocks.shuffle: a group is never split, whatever the input blocks, partitions, reducers and input
    blocks per map task."""
    import ray

    from polyko.data.shuffle import Blocks

    rng = np.random.default_rng(0)
    keys = rng.integers(0, 50, 5000)
    tables = [pa.table({"k": keys[i:i + 37], "x": np.arange(i, min(i + 37, 5000))}) for i in range(0, 5000, 37)]
    refs = [ray.put(t) for t in tables]

    def groups(t: pa.Table) -> pa.Table:  # use_threads=False: Acero's pool breaks in Ray worker threads
        return t.group_by("k", use_threads=False).aggregate([("x", "count")])

    for parts, reducers, group in ((7, 2, 1), (1, 1, 1), (64, 64, 1), (7, 2, 10), (64, 3, 200)):
        out = pa.concat_tables(ray.get(Blocks(refs).shuffle("k", parts, groups, reducers=reducers, group=group).refs))
        assert out.num_rows == len(set(keys.tolist()))  # one row per key: no group cut in two
        assert sorted(out["x_count"].to_pylist()) == sorted(np.bincount(keys)[np.unique(keys)].tolist())


def test_exact_marking_keeps_row_order_and_keys_hold_no_signatures():
    """The key table carries band hashes but no 512 B/doc signatures (verification recomputes them
    for the candidate pairs' ends), and ``_mark_exact`` leaves the rows in place (no copy of the
    table): every row's representative is the smallest id with the same canonical text."""
    from polyko.data.dedup import _band_columns, _KeysFn, _mark_exact

    rng = np.random.default_rng(1)
    texts = ["가나다라마바", "가나다라  마바", "사아자차카타", "파하 가나다", "사아자차카타"]
    rows = [{"id": int(i), "text": texts[int(rng.integers(len(texts)))]} for i in rng.permutation(200)]
    keys = _KeysFn(DedupConfig(), "text", "id", None)(pa.Table.from_pylist(rows))
    assert "_sig" not in keys.column_names
    assert [c for c in keys.column_names if c.startswith("_b")] == _band_columns(DedupConfig().band_rows()[0])
    marked = _mark_exact(keys)
    assert marked["id"].to_pylist() == [r["id"] for r in rows]
    best: dict = {}
    for r in rows:
        c = exact_canonical(r["text"])
        best[c] = min(best.get(c, r["id"]), r["id"])
    assert marked["_rep"].to_pylist() == [best[exact_canonical(r["text"])] for r in rows]
