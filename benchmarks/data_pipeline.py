"""Data pipeline throughput and memory at 1x / 10x / 50x of the shared corpus, on DISTINCT documents:
prints ONE JSON line.

    python benchmarks/data_pipeline.py                          # scales 1,10; pack with Polyglot-Ko BPE
    python benchmarks/data_pipeline.py --scales 1,10,50 --object-store-gb 2
    python benchmarks/data_pipeline.py --scales 1 --no-pack --no-distributed   # quick look

Inputs. Scale N = the shared corpus (variant 0, the real text) plus N-1 variants in which every Hangul
syllable and jamo is replaced through a seeded, frequency-preserving permutation (syllables ranked by
corpus frequency, shuffled within windows of 16 ranks; digits, Latin letters, punctuation, spacing and
document lengths untouched). A variant is a bijection of the text, so the corpus's own structure --
which documents are exact copies, which are near copies (the news / North-Korean-orthography pairs,
NSMC's repeated reviews) -- is reproduced exactly in every variant, while documents of different
variants share no shingles (a 5-syllable shingle survives a 1-in-16 permutation with odds 16^-5).
So dedup, write and packing see N x the documents, and the dedup counts the run reports
(``dedup_per_1x``: removed exact/near per 1x of input) must stay flat across scales -- the check that
the inputs are as redundant as the real corpus, no more (symlinked copies: 90 % exact duplicates at
10x) and no less (random recombination: none). Inputs hold only ``id``/``text``/``source``, and the
ids repeat across variants (as they do across real datasets): the pipeline keys documents itself.

Figures (all measured in this process, on this machine, on the same text):
* ``tokenizer_mb_s_per_core``: the baseline, HF ``tokenizers`` ``encode_batch`` (batches of 1024
  documents) on one thread (``TOKENIZERS_PARALLELISM=false``) over variants 0 and 1 (real and permuted
  text, equal weight): MB of UTF-8 text per wall second (``tokenizer_cpu_mb_s_per_core`` per CPU second).
  Measured before the pipeline runs and again after each scale's run (``tokenizer_cpu_mb_s_runs``);
  each scale's ratios use the FASTER of the two measurements around its run
  (``tokenizer_mb_s_by_scale`` / ``tokenizer_cpu_mb_s_by_scale``): on a shared machine the same code
  measured 2.7 and 3.6 MB per CPU-second an hour apart, and 3.3 and 2.1 before and after one 8-minute
  run, so a baseline taken next to the run it divides is the comparable one, and the faster of the pair
  is the one that makes the pipeline's ratio smaller. ``tokenizer_mb_s_per_core`` /
  ``tokenizer_cpu_mb_s_per_core``: the fastest measurement of all.
* ``encoder_cpu_mb_s_per_core``: what the packer actually encodes with, on the same text and thread:
  the tiktoken run of the same BPE (``polyko.tokenizer.rankbpe``, identical ids; None when the
  tokenizer does not qualify), measured once before the runs; ``pack_encoder`` per scale: the
  manifest's ``encoder`` entry (chunks per encoder, documents checked against the Rust tokenizer,
  fallbacks). The goal's baseline stays the Rust tokenizer: it is what a user would otherwise run.
* ``text_mb_s_per_core`` per scale: the input's TEXT bytes (UTF-8 of the ``text`` field; not JSON file
  bytes) / wall seconds of ``run_pipeline`` (read + clean + decontaminate-free + dedup [+ pack]) / CPUs of
  the Ray cluster; ``ratio_by_scale`` = that / the tokenizer's (goal >= 0.5 at 10x and 50x).
* ``cpu_s`` per scale: CPU seconds (user + system) of the whole process tree during the run, minus
  the benchmark's own sampler thread (``monitor_cpu_s``: it reads /proc of every process of the tree
  twice a second, ~0.1 of a core with ~25 Ray processes -- the instrument, not the pipeline);
  ``cpu_ratio_by_scale`` = (text MB / cpu_s) / ``tokenizer_cpu_mb_s_per_core``, the same ratio on CPU
  time, which other jobs on the machine do not deflate (it still counts Ray's own idle polling, so a
  longer wall time raises it a little); ``core_utilisation`` = cpu_s / (wall x CPUs): how much of
  the cluster the run kept busy (wall ratio ~ cpu ratio x utilisation on a quiet machine).
* ``cpu_breakdown_s`` per scale: those CPU seconds per process kind (as ``memory_breakdown_mb``), from
  each process's user + system time (/proc/PID/stat) between samples, charged to what its title names
  at the later sample (a worker that went ``ray::IDLE`` in between is charged to its previous task):
  so the stages' tasks (``ray::MapBatches(read_batch)->...``, ``...(_KeysFn)``, the dedup shuffles'
  named steps such as ``ray::dedup-buckets/map``, the pack actor's ``.submit``) and Ray's own processes (driver, raylet, gcs_server, agents, Ray Data's
  ``_StatsActor`` ..., ``ray::IDLE`` = worker start-up and idle polling) side by side; ``[monitor]`` is
  the sampler thread, reported apart from ``driver``.
* ``peak_rss_mb`` per scale: peak summed RSS of this process and all its descendants (Ray's GCS,
  raylet, object store, workers), sampled every 0.5 s; ``rss_ratio`` = largest scale / previous
  scale (goal <= 1.3 for 50x / 10x). RSS counts shared object-store pages in every process that maps
  them (over-states in absolute terms); ``--object-store-gb`` caps the store so it spills to disk.
  ``peak_pss_mb`` / ``pss_ratio``: the same with each process's PSS (shared pages divided among the
  processes mapping them): the tree's real memory, the figure the memory goal is judged on (RSS
  counts the object store once per worker that touched it).
* ``memory_breakdown_mb`` per scale: ``at_peak`` = PSS per process kind (driver, raylet, gcs_server,
  ``ray::<task>`` as each worker's process title names what it ran) in the sample where the tree's
  PSS peaked, plus ``[anon]`` / ``[shmem]`` (the object store, in /dev/shm) / ``[file]`` of that
  sample; ``peak_by_kind`` = each kind's own peak (not simultaneous).
* ``dedup_path`` per scale: the path the DEFAULT config took (``one-task`` up to ``local_max_docs``
  documents, else ``distributed``).
* ``distributed``: the dedup paths compared, both without the pack stage: the default run minus its
  pack time against a second run forced onto the OTHER path (``local_max_docs=0`` where the default
  was one-task; ``local_max_docs`` raised past the corpus, i.e. the real one-task path, where the
  default already shuffled -- 50x here); ``compared`` says which. ``seconds`` / ``local_seconds``,
  ``dist_over_local`` (goal <= 2 at the largest scale), the distributed side's RSS/PSS, the second
  run's breakdown, and whether both outputs are equal (``same_output``).
* ``load_avg_1m``: the machine's load when the run started (other jobs deflate every wall figure).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("POLYKO_SHARED_DATA", REPO.parent / "shared" / "data"))
WINDOW = 16  # ranks per permutation window


def _smaps_kb(pid: int) -> dict[str, int]:
    """Rss / Pss / Pss_Anon / Pss_Shmem / Pss_File (kB) from /proc/PID/smaps_rollup (Linux >= 5.x):
    one small read per process, but the kernel walks the process's page tables for it: ~4 ms for a
    worker that maps a 2 GB object store, ~50 ms a sample with a dozen Ray processes (~0.1 of a core
    at 0.5 s). Kept at 0.5 s: in one run each, a 1 s sampler saved a third of that but saw a lower 10x
    peak (PSS 1.95 vs 2.03 GB; 50x unchanged), and a peak shorter than the interval goes unseen."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
        for line in f:
            k, _, v = line.partition(b":")
            if k in (b"Rss", b"Pss", b"Pss_Anon", b"Pss_Shmem", b"Pss_File"):
                out[k.decode()] = int(v.split()[0])
    return out


def process_kind(p, driver_pid: int) -> str:
    """What a process of the tree is: ``driver``, ``raylet`` (it also hosts the plasma object store),
    ``gcs_server``, ``ray_agents`` (dashboard / runtime-env / log-monitor helpers), or ``ray::<task or
    actor>`` for a worker as its process title names what it runs at that instant (Ray sets it per
    task; ``ray::IDLE`` between tasks)."""
    if p.pid == driver_pid:
        return "driver"
    try:
        cmd = p.cmdline()
    except Exception:  # noqa: BLE001 - a process that exited while being sampled
        return "other"
    head = cmd[0] if cmd else p.name()
    if head.startswith("ray::"):
        name = head.split()[0]
        if name in ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::IDLE_SpillWorker", "ray::IDLE_RestoreWorker"):
            return name
        if "Spill" in name or "Restore" in name:
            return "ray::spill/restore"
        if "(" not in name:  # an actor's "ray::Class.method" / "ray::name:Class.method" -> "ray::Class"
            name = "ray::" + name[5:].split(".")[0].split(":")[-1]
        return name  # e.g. ray::dedup-exact/map, ray::dedup-buckets/reduce, ray::MapBatches(_KeysFn), ray::PackActor
    base = os.path.basename(head)
    if "raylet" in base:
        return "raylet"
    if "gcs_server" in base:
        return "gcs_server"
    joined = " ".join(cmd)
    if "default_worker.py" in joined:
        return "ray::IDLE"  # a worker that has not run anything yet
    if "log_monitor" in joined or "dashboard" in joined or "monitor.py" in joined:
        return "ray_agents"
    return base


class PeakRSS:
    """Peak summed RSS / PSS (bytes) and CPU seconds of this process tree, sampled in a thread.

    ``cpu_s``: user + system seconds the tree spent while the monitor ran -- per process the last
    sample minus its value at start (0 for processes born later), so workers that exit between
    samples lose at most one interval. Unlike wall time it does not grow when other jobs share the
    cores, which makes it the figure to compare runs on a loaded machine by.

    Breakdown (MB): ``at_peak`` = PSS per process kind (:func:`process_kind`) in the sample where the
    tree's PSS peaked, plus that sample's split into anonymous heap (``anon``), shared memory
    (``shmem``: the plasma object store lives in /dev/shm, so this is the store's resident part)
    and file pages; ``peak_by_kind`` = each kind's own peak over the run (not simultaneous)."""

    def __init__(self, interval: float = 0.5) -> None:
        import psutil

        self.proc, self.interval, self.peak, self.peak_pss = psutil.Process(), interval, 0, 0
        self._cpu0: dict[int, float] = {}
        self._cpu: dict[int, float] = {}
        self.at_peak: dict = {}
        self.peak_by_kind: Counter = Counter()
        self.cpu_by_kind: Counter = Counter()
        self._kind: dict = {}
        self.monitor_cpu_s = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        import psutil

        total = pss = 0
        kinds: Counter = Counter()
        split: Counter = Counter()
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                m = _smaps_kb(p.pid)
                c = p.cpu_times()
                key = (p.pid, p.create_time())
                kind = process_kind(p, self.proc.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError):
                continue
            # CPU seconds since the previous sample go to what the process is doing NOW: a worker's
            # title names its current task, so over 0.5 s samples this splits a worker's time by task
            # A worker that finished a task within the interval shows ray::IDLE now: its CPU since the
            # last sample is the task's, so IDLE gets only intervals idle at both ends (and the
            # start-up of a new worker, which has no previous sample).
            prev = self._cpu.get(key, self._cpu0.get(key, 0.0))
            self._cpu[key] = c.user + c.system
            before = self._kind.get(key)
            self._kind[key] = kind
            if kind == "ray::IDLE" and before is not None:
                kind = before if before != "ray::IDLE" else kind
            self.cpu_by_kind[kind] += self._cpu[key] - prev
            total += m.get("Rss", 0) << 10
            pss += m.get("Pss", 0) << 10
            kinds[kind] += m.get("Pss", 0) << 10
            for k, name in (("Pss_Anon", "anon"), ("Pss_Shmem", "shmem"), ("Pss_File", "file")):
                split[name] += m.get(k, 0) << 10
        for k, v in kinds.items():
            self.peak_by_kind[k] = max(self.peak_by_kind[k], v)
        if pss > self.peak_pss:
            self.peak_pss = pss
            self.at_peak = {"by_kind": dict(kinds), "split": dict(split)}
        return total

    def breakdown(self) -> dict:
        """MB figures (see the class docstring); kinds under 20 MB are folded into ``other``."""
        def mb(d: dict) -> dict:
            out: Counter = Counter()
            for k, v in sorted(d.items(), key=lambda kv: -kv[1]):
                out[k if v >= 20 << 20 else "other"] += v
            return {k: round(v / 2**20) for k, v in out.items()}

        return {"at_peak": {**mb(self.at_peak.get("by_kind", {})),
                            **{f"[{k}]": round(v / 2**20) for k, v in self.at_peak.get("split", {}).items()}},
                "peak_by_kind": mb(self.peak_by_kind)}

    def cpu_breakdown(self) -> dict:
        """CPU seconds (user + system) per process kind over the run, largest first; kinds under 0.5 s
        are folded into ``other``. Sums to ``cpu_s`` up to the last interval of workers that exited."""
        kinds = Counter(self.cpu_by_kind)
        kinds["driver"] -= self.monitor_cpu_s  # the sampler thread: reported as [monitor], not driver
        kinds["[monitor]"] = self.monitor_cpu_s
        out: Counter = Counter()
        for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]):
            out[k if v >= 0.5 else "other"] += v
        return {k: round(v, 1) for k, v in out.items()}

    @property
    def cpu_s(self) -> float:
        return sum(v - self._cpu0.get(k, 0.0) for k, v in self._cpu.items())

    def _run(self) -> None:
        c0 = time.thread_time()  # this thread's user + system time: the sampler's own cost
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            time.sleep(self.interval)
            self.monitor_cpu_s = time.thread_time() - c0

    def __enter__(self) -> "PeakRSS":
        self.sample()
        self._cpu0 = dict(self._cpu)
        self.peak_pss, self.at_peak, self.peak_by_kind, self.cpu_by_kind = 0, {}, Counter(), Counter()
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.sample()


def load_corpus(corpus: Path, max_files: int | None) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(relative path, [(text, source)])] of the shared corpus's JSONL files."""
    files = sorted(corpus.rglob("*.jsonl"))[: max_files or None]
    out = []
    for f in files:
        rows = []
        for line in open(f, encoding="utf-8"):
            if line.strip():
                r = json.loads(line)
                rows.append((r["text"], r.get("source") or f.parent.name))
        out.append((str(f.relative_to(corpus)), rows))
    return out


def _is_korean(ch: str) -> bool:
    o = ord(ch)
    return 0xAC00 <= o <= 0xD7A3 or 0x3131 <= o <= 0x318E


def variant_tables(corpus: list, n: int, seed: int = 0) -> list[dict[int, str] | None]:
    """str.translate tables: variant 0 is the identity, variant j a frequency-preserving permutation
    of the Hangul syllables and jamo (within windows of WINDOW frequency ranks)."""
    import numpy as np

    freq = Counter(ch for _, rows in corpus for t, _ in rows for ch in t if _is_korean(ch))
    ranked = [ch for ch, _ in freq.most_common()]
    tables: list[dict[int, str] | None] = [None]
    for j in range(1, n):
        rng = np.random.default_rng(seed * 1000 + j)
        table = {}
        for w in range(0, len(ranked), WINDOW):
            win = ranked[w:w + WINDOW]
            perm = rng.permutation(len(win))
            if len(win) > 1:
                while (perm == np.arange(len(win))).any():  # no syllable maps to itself
                    perm = rng.permutation(len(win))
            table.update({ord(a): win[p] for a, p in zip(win, perm)})
        tables.append(table)
    return tables


def write_scale(corpus: list, tables: list, root: Path, n: int) -> tuple[Path, int]:
    """``root/x<n>/v<j>/<relpath>`` for variants 0..n-1; returns (dir, text bytes)."""
    out, nbytes = root / f"x{n}", 0
    for j in range(n):
        for rel, rows in corpus:
            dst = out / f"v{j}" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            with open(dst, "w", encoding="utf-8") as f:
                for i, (t, src) in enumerate(rows):
                    t = t if tables[j] is None else t.translate(tables[j])
                    nbytes += len(t.encode("utf-8"))
                    f.write(json.dumps({"id": i, "text": t, "source": src}, ensure_ascii=False) + "\n")
    return out, nbytes


def baseline_texts(corpus: list, tables: list) -> tuple[list[str], int]:
    """The text both speed baselines encode: variants 0 and 1 (real and permuted, equal weight), and
    its UTF-8 bytes."""
    texts = [t for _, rows in corpus for t, _ in rows]
    if len(tables) > 1:
        texts += [t.translate(tables[1]) for t in texts]
    return texts, sum(len(t.encode("utf-8")) for t in texts)


def encoder_speed(corpus: list, tables: list, tokenizer_dir: Path, batch: int = 1024) -> float | None:
    """CPU MB/s of the packer's rank encoder (``polyko.tokenizer.rankbpe``, one thread) on the
    baseline's text; None when the tokenizer does not qualify (the packer then uses the Rust one)."""
    from polyko.tokenizer.rankbpe import rank_encoder

    enc, _ = rank_encoder(tokenizer_dir)
    if enc is None:
        return None
    texts, nbytes = baseline_texts(corpus, tables)
    c0 = time.thread_time()
    for i in range(0, len(texts), batch):
        enc.encode_docs(texts[i:i + batch])
    return nbytes / 1e6 / (time.thread_time() - c0)


def tokenizer_baseline(corpus: list, tables: list, tokenizer_dir: Path, batch: int = 1024) -> tuple[float, float]:
    """(wall MB/s, CPU MB/s) of one thread of HF tokenizers encode_batch over variants 0 and 1."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before the import: read when the pool starts
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    texts, nbytes = baseline_texts(corpus, tables)
    t0, c0 = time.perf_counter(), time.thread_time()
    for i in range(0, len(texts), batch):
        tok.encode_batch(texts[i:i + batch])
    return nbytes / 1e6 / (time.perf_counter() - t0), nbytes / 1e6 / (time.thread_time() - c0)


def run_once(inp: Path, out: Path, tokdir: Path | None, local_max_docs: int | None) -> tuple[dict, float, "PeakRSS"]:
    from polyko.data.pipeline import PipelineConfig, run_pipeline

    cfg = PipelineConfig(output=str(out), inputs=(str(inp),), track=False,
                         tokenizer=str(tokdir) if tokdir else None)
    if local_max_docs is not None:
        cfg.dedup.local_max_docs = local_max_docs
    with PeakRSS() as mon:
        t0 = time.perf_counter()
        stats = run_pipeline(cfg)
        secs = time.perf_counter() - t0
    return stats, secs, mon


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(SHARED / "corpus"))
    ap.add_argument("--tokenizer", default=str(SHARED / "reference" / "polyglot-ko-tokenizer"))
    ap.add_argument("--no-pack", action="store_true", help="clean + dedup only")
    ap.add_argument("--no-distributed", action="store_true", help="skip the local_max_docs=0 runs")
    ap.add_argument("--max-files", type=int, default=None, help="use only the first N corpus files")
    ap.add_argument("--scales", default="1,10")
    ap.add_argument("--num-cpus", type=int, default=None, help="local cluster CPUs (default: all)")
    ap.add_argument("--object-store-gb", type=float, default=2.0,
                    help="object store size (spills to disk beyond it); 0 = Ray's default (30%% of RAM)")
    ap.add_argument("--workdir", default=None, help="where the scaled inputs and outputs go (default: a temp dir)")
    args = ap.parse_args()

    import ray

    from polyko.cluster import init_ray

    from polyko.data.dedup import DedupConfig

    default_local_max = DedupConfig().local_max_docs
    corpus_dir, tokdir = Path(args.corpus), Path(args.tokenizer)
    scales = [int(s) for s in args.scales.split(",")]
    corpus = load_corpus(corpus_dir, args.max_files)
    tables = variant_tables(corpus, max(scales + [2]))
    tok_runs = [tokenizer_baseline(corpus, tables, tokdir)]  # and again after each scale's run
    enc_mb_s = encoder_speed(corpus, tables, tokdir)
    kw = {"object_store_memory": int(args.object_store_gb * 2**30)} if args.object_store_gb else {}
    load = os.getloadavg()[0]
    init_ray(num_cpus=args.num_cpus, include_dashboard=False, **kw)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    res: dict = {"benchmark": "data_pipeline", "files": len(corpus), "cpus": cpus, "pack": not args.no_pack,
                 "object_store_gb": args.object_store_gb, "load_avg_1m": round(load, 2),
                 "text_mb": {}, "documents_in": {}, "seconds": {}, "text_mb_s_per_core": {}, "ratio_by_scale": {},
                 "peak_rss_mb": {}, "peak_pss_mb": {}, "cpu_s": {}, "monitor_cpu_s": {}, "cpu_ratio_by_scale": {}, "core_utilisation": {},
                 "dedup_per_1x": {}, "stage_seconds": {}, "pack_encoder": {},
                 "encoder_cpu_mb_s_per_core": enc_mb_s and round(enc_mb_s, 3)}
    dist: dict = {"seconds": {}, "local_seconds": {}, "compared": {}, "peak_rss_mb": {}, "peak_pss_mb": {},
                  "dist_over_local": {}, "same_output": {}, "memory_breakdown_mb": {}}
    res["dedup_path"], res["memory_breakdown_mb"], res["cpu_breakdown_s"] = {}, {}, {}
    measured: dict = {}  # per scale: (text MB, wall s, CPU s) -> the ratios, once the baseline is final
    with tempfile.TemporaryDirectory(prefix="polyko-bench-", dir=args.workdir) as tmp:
        for n in scales:
            inp, text_bytes = write_scale(corpus, tables, Path(tmp), n)
            key = f"x{n}"
            stats, secs, mon = run_once(inp, Path(tmp) / f"out{n}", None if args.no_pack else tokdir, None)
            cpu_s, mb = mon.cpu_s, text_bytes / 1e6
            # what the default config did at this size (the key table holds the documents kept by cleaning)
            one_task = stats["kept_after_clean"] <= default_local_max
            res["dedup_path"][key] = "one-task" if one_task else "distributed"
            res["text_mb"][key] = round(mb, 1)
            res["documents_in"][key] = stats["documents_in"]
            res["seconds"][key] = round(secs, 1)
            res["text_mb_s_per_core"][key] = round(mb / secs / cpus, 3)
            res["peak_rss_mb"][key] = round(mon.peak / 2**20)
            res["peak_pss_mb"][key] = round(mon.peak_pss / 2**20)
            res["memory_breakdown_mb"][key] = mon.breakdown()
            res["cpu_breakdown_s"][key] = mon.cpu_breakdown()
            # the sampler thread runs in the driver and reads /proc of every process 4x a second:
            # the benchmark's instrument, not the pipeline, so its own CPU is reported apart
            res["monitor_cpu_s"][key] = round(mon.monitor_cpu_s, 1)
            res["cpu_s"][key] = round(cpu_s - mon.monitor_cpu_s, 1)
            measured[key] = (mb, secs, cpu_s - mon.monitor_cpu_s)
            res["core_utilisation"][key] = round((cpu_s - mon.monitor_cpu_s) / secs / cpus, 3)
            res["dedup_per_1x"][key] = {k: round(v / n) for k, v in stats["duplicates_removed"].items()}
            res["stage_seconds"][key] = stats["timings_s"]
            if not args.no_pack:
                res["pack_encoder"][key] = json.loads((Path(tmp) / f"out{n}" / "tokens" / "manifest.json")
                                                      .read_text())["encoder"]
            print(f"x{n}: {mb:.0f} MB text in {secs:.0f} s, peak PSS {mon.peak_pss / 2**20:.0f} MB "
                  f"({res['dedup_path'][key]} dedup), dedup {stats['duplicates_removed']}, "
                  f"breakdown {res['memory_breakdown_mb'][key]['at_peak']}, CPU-s {res['cpu_breakdown_s'][key]}",
                  file=sys.stderr, flush=True)
            if not args.no_distributed:
                # like for like, both without the pack stage: the default run minus its pack time is one
                # side; the other side is a second run forced onto the other dedup path (the one-task
                # path with local_max_docs raised past the corpus when the default already shuffled)
                other = 0 if one_task else max(default_local_max, stats["kept_after_clean"])
                ostats, osecs, omon = run_once(inp, Path(tmp) / f"other{n}", None, other)
                default_s = secs - stats["timings_s"].get("pack_s", 0.0)
                dsecs, lsecs = (osecs, default_s) if one_task else (default_s, osecs)
                dmon = omon if one_task else mon
                dist["compared"][key] = ("default (one-task) minus pack vs local_max_docs=0" if one_task else
                                         f"default (distributed) minus pack vs local_max_docs={other} (one-task)")
                dist["seconds"][key] = round(dsecs, 1)
                dist["local_seconds"][key] = round(lsecs, 1)
                dist["peak_rss_mb"][key] = round(dmon.peak / 2**20)
                dist["peak_pss_mb"][key] = round(dmon.peak_pss / 2**20)
                dist["memory_breakdown_mb"][key] = omon.breakdown()
                dist["dist_over_local"][key] = round(dsecs / lsecs, 3)
                dist["same_output"][key] = (ostats["documents_out"] == stats["documents_out"]
                                            and ostats["duplicates_removed"] == stats["duplicates_removed"])
                print(f"x{n} {'distributed' if one_task else 'one-task'} dedup: {osecs:.0f} s, peak PSS "
                      f"{omon.peak_pss / 2**20:.0f} MB, breakdown {dist['memory_breakdown_mb'][key]['at_peak']}",
                      file=sys.stderr, flush=True)
            import shutil

            shutil.rmtree(inp, ignore_errors=True)
            tok_runs.append(tokenizer_baseline(corpus, tables, tokdir))  # the cluster is idle now
    ray.shutdown()
    res.update(tokenizer_mb_s_per_core=round(max(r[0] for r in tok_runs), 3),
               tokenizer_cpu_mb_s_per_core=round(max(r[1] for r in tok_runs), 3),
               tokenizer_cpu_mb_s_runs=[round(r[1], 3) for r in tok_runs],
               tokenizer_mb_s_by_scale={}, tokenizer_cpu_mb_s_by_scale={})
    for i, (key, (mb, secs, cpu_s)) in enumerate(measured.items()):
        # the faster of the measurements just before and just after this scale's run
        tok_mb_s, tok_cpu_mb_s = (max(r[j] for r in tok_runs[i:i + 2]) for j in (0, 1))
        res["tokenizer_mb_s_by_scale"][key] = round(tok_mb_s, 3)
        res["tokenizer_cpu_mb_s_by_scale"][key] = round(tok_cpu_mb_s, 3)
        res["ratio_by_scale"][key] = round(mb / secs / cpus / tok_mb_s, 3)
        res["cpu_ratio_by_scale"][key] = round(mb / cpu_s / tok_cpu_mb_s, 3)
    if len(scales) > 1:
        res["rss_ratio"] = round(res["peak_rss_mb"][f"x{scales[-1]}"] / res["peak_rss_mb"][f"x{scales[-2]}"], 3)
        res["pss_ratio"] = round(res["peak_pss_mb"][f"x{scales[-1]}"] / res["peak_pss_mb"][f"x{scales[-2]}"], 3)
    if not args.no_distributed:
        res["distributed"] = dist
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    sys.exit(main())
