"""Pretraining checkpoints: DeepSpeed engine state + a metadata file that commits it.

Layout of one checkpoint (Ray Train merges every rank's files into ``<run>/step_XXXXXX``)::

    ds/mp_rank_00_model_states.pt              DeepSpeed: module weights (+ optimizer state at ZeRO-0)
    ds/*zero_pp_rank_R_mp_rank_00_optim_states.pt   one per data-parallel rank at ZeRO 1-3
    polyko_checkpoint.json                     written LAST by rank 0: step, tokens seen, data position,
                                               world size, ZeRO stage, precision, config, and the size of
                                               every file of every rank
    universal/                                 only after a resume at another worker count / ZeRO stage:
                                               the DeepSpeed universal copy and its conversion's lease files
                                               (see "resharding" below); not part of the checkpoint's files

A checkpoint is valid only if its metadata parses and every listed file exists with the listed size;
an incomplete or corrupt one (crash during upload, truncated file) is skipped with a warning in favour
of the previous one. Checkpoints saved by ``w`` workers load on ``w`` workers directly; on another
worker count (or ZeRO stage) a ZeRO 1-3 (or bf16) checkpoint is first converted, once, to a DeepSpeed
*universal* checkpoint (``ds_to_universal``, :func:`reshard`) and loaded with ``load_universal`` -- a ZeRO-0
fp32 one loads anywhere.

RNG: the train loop reseeds from ``(seed, step, rank)`` each step, so the random state is a function of
the step and needs no saving (recorded as ``rng`` in the metadata).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from polyko.cluster import stop_process_group

log = logging.getLogger(__name__)

META = "polyko_checkpoint.json"
DS_TAG = "ds"
FORMAT = "polyko-checkpoint-v1"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint directory that is incomplete, corrupt or not a polyko checkpoint."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _file_sizes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def save(engine, step: int, meta: dict[str, Any]) -> Path:
    """Collective: every rank saves its DeepSpeed shard into a fresh local temp dir; rank 0 gathers all
    ranks' file lists and writes the metadata last. Returns this rank's dir (report it, then delete it)."""
    import torch.distributed as dist

    tmp = Path(tempfile.mkdtemp(prefix=f"polyko-ckpt-{step}-"))
    engine.save_checkpoint(str(tmp), tag=DS_TAG)
    files = _file_sizes(tmp)
    world = dist.get_world_size() if dist.is_initialized() else 1
    gathered: list[dict[str, int]] = [dict() for _ in range(world)]
    if world > 1:
        dist.all_gather_object(gathered, files)
    else:
        gathered = [files]
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
        all_files: dict[str, int] = {}
        for f in gathered:
            all_files.update(f)
        body = {"format": FORMAT, "step": step, "tag": DS_TAG, "files": all_files, **meta}
        part = tmp / (META + ".tmp")
        part.write_text(json.dumps(body, indent=2))
        part.replace(tmp / META)
    return tmp


def validate(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a complete checkpoint; :class:`CheckpointError` saying what is wrong otherwise."""
    p = Path(path)
    f = p / META
    if not f.is_file():
        raise CheckpointError(f"{p}: no {META} (incomplete: the save or upload did not finish)")
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}/{META} is corrupt: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{p}/{META}: unknown format {meta.get('format')!r}")
    for rel, size in meta["files"].items():
        q = p / rel
        if not q.is_file():
            raise CheckpointError(f"{p}: missing {rel}")
        if q.stat().st_size != size:
            raise CheckpointError(f"{p}: {rel} has {q.stat().st_size} bytes, expected {size} (truncated/corrupt)")
    return meta


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """``step_*`` directories of a run directory, newest first."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), c) for c in d.iterdir() if c.is_dir() and (m := _STEP_DIR.match(c.name))]
    return [c for _, c in sorted(found, reverse=True)]


def select(latest: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The newest valid checkpoint at or before ``latest`` (its ``step_*`` siblings are the fallbacks);
    invalid ones are skipped with a warning. ``None`` when none is valid."""
    latest = Path(latest)
    m = _STEP_DIR.match(latest.name)
    cands = [latest]
    if m:
        cands += [c for c in list_checkpoints(latest.parent) if c != latest and
                  int(_STEP_DIR.match(c.name).group(1)) < int(m.group(1))]
    for c in cands:
        try:
            return c, validate(c)
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
            print(f"[polyko] WARNING skipping checkpoint: {e}", file=sys.stderr, flush=True)
    return None


def needs_universal(meta: dict[str, Any], world_size: int) -> bool:
    """True when the checkpoint's optimizer state is partitioned for another world size."""
    partitioned = meta["zero_stage"] >= 1 or meta.get("precision") == "bf16"
    return partitioned and meta["world_size"] != world_size



# ------------------------------------------------------------------------------------------ resharding
#
# A ZeRO 1-3 checkpoint resumed on another worker count (or ZeRO stage) is converted once to a DeepSpeed
# universal checkpoint in ``<step>/universal/`` (shared storage, beside the checkpoint, so Ray's rotation
# deletes both together). Every rank of the resuming group calls :func:`reshard`; ranks coordinate only
# through files there -- never a collective, so the process group's hang timeout cannot fire while a
# conversion of hours runs:
#
#   universal/lease.NNNN   one per conversion attempt (generation NNNN), created with O_EXCL: exactly
#                          one process wins a generation. Its converter rewrites it every HEARTBEAT_S
#                          (beat counter, phase, items done). A lease whose beat has not changed for
#                          ``lease_ttl_s`` on the observer's own clock (no cross-node clock skew) is
#                          dead, and the next generation is taken over. A converter that sees a newer
#                          generation than its own exits, so two never write at once.
#   universal/done/        one marker per finished ds_to_universal work item (extract: one per ZeRO
#                          rank file; merge: one per parameter): a taken-over conversion skips them.
#   universal/ds/          ds_to_universal's output (``load_universal``), universal/DONE when complete.
#
# The converter is a subprocess of the lease winner in its own session, using ds_to_universal's process
# pools (``--num_extract_workers`` / ``--num_merge_workers``) on the CPUs the waiting ranks leave idle,
# not a Ray task: it must run where the files are (a downloaded copy is node-local), and an all-GPU
# placement may leave no CPU for Ray to schedule it on. If Ray kills its worker it keeps running and
# the restarted group waits for it instead of starting over.

UNIVERSAL = "universal"
DONE = "DONE"
HEARTBEAT_S = 2.0
LEASE_TTL_S = 60.0          # heartbeat every 2 s: 30 missed beats = dead (a busy NFS server can stall seconds)
_LEASE = re.compile(r"^lease\.(\d{4})$")


def needs_reshard(meta: dict[str, Any], world_size: int, zero_stage: int) -> bool:
    """True when checkpoint ``meta`` cannot load directly at ``world_size`` workers and ZeRO ``zero_stage``."""
    return needs_universal(meta, world_size) or meta["zero_stage"] != zero_stage


def universal_dir(path: str | os.PathLike) -> Path:
    """Where the universal copy of checkpoint ``path`` lives: ``<path>/universal`` (shared, converted once
    for all nodes), or a node-local directory when the checkpoint directory is read-only."""
    p = Path(path)
    if os.access(p, os.W_OK):
        return p / UNIVERSAL
    return universal_cache_dir(p)


def universal_cache_dir(path: str | os.PathLike) -> Path:
    """Node-local place for the universal copy of a read-only checkpoint (keyed by its path)."""
    import hashlib

    key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "polyko-universal" / key


def _read_json(p: Path) -> dict[str, Any] | None:
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # gone, or caught between truncate and write on a filesystem without atomic replace


def _write_json(p: Path, body: dict[str, Any]) -> None:
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(body))
    tmp.replace(p)


def latest_lease(uni: Path) -> tuple[int, dict[str, Any] | None]:
    """``(generation, lease body)`` of the newest conversion attempt in ``uni``; ``(0, None)`` when none."""
    gens = [int(m.group(1)) for c in (os.listdir(uni) if uni.is_dir() else []) if (m := _LEASE.match(c))]
    if not gens:
        return 0, None
    g = max(gens)
    return g, _read_json(uni / f"lease.{g:04d}") or {"state": "starting", "beat": -1}


def acquire_lease(uni: Path, gen: int, owner: str) -> bool:
    """Try to create generation ``gen``'s lease; True for exactly one caller per generation."""
    uni.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(uni / f"lease.{gen:04d}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"gen": gen, "owner": owner, "state": "starting", "beat": 0, "started": time.time()}, f)
    return True


class LeaseWatch:
    """Observer-side liveness: a lease is dead when its ``beat`` has not changed for ``ttl_s`` seconds of
    *this* process's monotonic clock."""

    def __init__(self, ttl_s: float):
        self.ttl_s, self.seen = ttl_s, {}  # gen -> (beat, first seen at)

    def dead(self, gen: int, lease: dict[str, Any]) -> bool:
        now = time.monotonic()
        beat = (lease.get("beat"), lease.get("state"))
        if self.seen.get(gen, (None,))[0] != beat:
            self.seen[gen] = (beat, now)
        return now - self.seen[gen][1] > self.ttl_s


def reshard(path: str | os.PathLike, *, timeout_s: float, workers: int | None = None,
            lease_ttl_s: float = LEASE_TTL_S, chaos_delay_s: float = 0.0, announce: bool = True,
            log_every_s: float = 30.0, poll_s: float = 1.0) -> Path:
    """The universal copy of checkpoint ``path``, converting it if no one has; blocks until it is complete.

    Safe to call from any number of processes on any nodes at once (every rank of a resuming group, or
    a user ahead of time): one converts, the others wait, a dead conversion is taken over where it
    stopped. ``timeout_s`` bounds this call (CheckpointError naming ``checkpoint.reshard_timeout_s``);
    ``workers`` is ds_to_universal's extract pool (merge: half of it; default: this node's CPUs).
    ``chaos_delay_s`` (chaos testing only) makes a conversion started here take that much longer.
    ``announce``: print progress (one rank per group does).
    """
    import socket
    import uuid

    path = Path(path)
    uni = universal_dir(path)
    uni.mkdir(parents=True, exist_ok=True)
    me = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    watch = LeaseWatch(lease_ttl_s)
    t0 = time.monotonic()
    last_log = t0
    proc: subprocess.Popen | None = None
    mine = 0
    first: dict[int, str] = {}  # gen -> state when first seen (a lease already failed then may be retried)

    def say(msg: str) -> None:
        if announce:
            print(f"[polyko] resharding {path.name}: {msg}", flush=True)

    while True:
        if (uni / DONE).is_file():
            if proc is not None:
                proc.wait()
            say(f"universal checkpoint ready in {uni} ({time.monotonic() - t0:.0f} s waited)")
            return uni
        gen, lease = latest_lease(uni)
        if proc is not None and proc.poll() is not None and gen > mine:
            proc = None  # ours was declared dead and taken over (it exited on seeing that): wait for the new one
        if proc is not None and proc.poll() is not None and not (uni / DONE).is_file():
            tail = _tail(uni / f"convert.{mine:04d}.log")
            raise CheckpointError(f"converting {path} to a universal checkpoint failed (exit {proc.returncode}); "
                                  f"log {uni}/convert.{mine:04d}.log:\n{tail}")
        if lease is not None:
            first.setdefault(gen, lease.get("state", ""))
        if proc is None:
            retry = lease is not None and lease.get("state") == "failed" and first[gen] == "failed"
            if lease is not None and lease.get("state") == "failed" and not retry:
                raise CheckpointError(f"converting {path} to a universal checkpoint failed in {lease.get('owner')}: "
                                      f"{lease.get('error', '?')}")
            if lease is None or retry or watch.dead(gen, lease):
                if lease is not None:
                    why = "failed earlier" if retry else f"dead (no heartbeat for {lease_ttl_s:.0f} s)"
                    say(f"conversion attempt {gen} by {lease.get('owner')} is {why}: taking over")
                if acquire_lease(uni, gen + 1, me):
                    mine = gen + 1
                    proc = _start_converter(path, uni, mine, workers, chaos_delay_s)
                    say(f"converting to {uni} (attempt {mine}, converter pid {proc.pid})")
                    continue
        now = time.monotonic()
        if now - t0 > timeout_s:
            if proc is not None:
                stop_process_group(proc, 20)
            raise CheckpointError(f"resharding {path} did not finish within checkpoint.reshard_timeout_s={timeout_s:.0f} s "
                                  f"(attempt {gen}: {_progress(lease)}); the finished part is kept in {uni} and a "
                                  "restart continues it. Raise checkpoint.reshard_timeout_s or checkpoint.reshard_workers")
        if now - last_log >= log_every_s:
            last_log = now
            say(f"{_progress(lease)}, {now - t0:.0f} s (converter {lease and lease.get('owner')})")
        time.sleep(poll_s)


def _progress(lease: dict[str, Any] | None) -> str:
    if not lease:
        return "no converter yet"
    ph = lease.get("phase") or lease.get("state", "starting")
    if lease.get("total"):
        return f"{ph} {lease.get('done', 0)}/{lease['total']} items"
    return ph


def _tail(p: Path, n: int = 3000) -> str:
    try:
        return p.read_text(errors="replace")[-n:]
    except FileNotFoundError:
        return "(no log)"


def _start_converter(path: Path, uni: Path, gen: int, workers: int | None, chaos_delay_s: float) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "import sys; from polyko.train.checkpoint import _main; sys.exit(_main())",
           "--convert", str(path), "--universal", str(uni),
           "--gen", str(gen), "--workers", str(workers or 0), "--chaos-delay-s", str(chaos_delay_s)]
    log = open(uni / f"convert.{gen:04d}.log", "w")
    # Own session: survives its worker's death (SIGKILL of the Ray worker) and can be stopped as a group.
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def prepare_resume(path: str | os.PathLike, meta: dict[str, Any], *, world_size: int, rank: int,
                   local_rank: int, zero_stage: int, timeout_s: float, workers: int | None = None,
                   chaos_delay_s: float = 0.0) -> tuple[Path, bool]:
    """Called by EVERY rank before ``deepspeed.initialize`` when resuming from checkpoint ``path``.

    Returns ``(dir to pass to engine.load_checkpoint, load_universal)``. When the checkpoint's optimizer
    state is partitioned for another world size (or ZeRO stage) it is converted to a universal checkpoint
    first (:func:`reshard`: once, in ``<path>/universal``, by one converter, the other ranks polling).
    Contract for callers: this function runs no collective (no ``dist.barrier``), so the hang timeout
    of the process group never bounds it; ``timeout_s`` (``checkpoint.reshard_timeout_s``) is its own limit.
    """
    if not needs_reshard(meta, world_size, zero_stage):
        return Path(path), False
    if (meta["zero_stage"] == 3) != (zero_stage == 3):
        # A universal checkpoint keeps the source's model-states files: ZeRO-3 engines look for one per rank
        # (zero_pp_rank_R_mp_rank_00_model_states.pt), ZeRO-1/2 engines for mp_rank_00_model_states.pt.
        raise CheckpointError(f"{path} was saved at ZeRO-{meta['zero_stage']}; DeepSpeed's universal checkpoint "
                              f"does not load it at ZeRO-{zero_stage} (ZeRO-1/2 and ZeRO-3 checkpoints reshard only "
                              f"within their kind): resume with deepspeed.zero_stage={meta['zero_stage']}")
    if timeout_s <= 0:
        raise ValueError(f"checkpoint.reshard_timeout_s must be positive, got {timeout_s}")
    if meta["zero_stage"] == 0:
        raise CheckpointError(f"{path} was saved at ZeRO-0 (optimizer state not partitioned, no ZeRO files to "
                              f"convert): resume it with deepspeed.zero_stage=0, at any worker count")
    if rank == 0:
        print(f"[polyko] resharding {path} ({meta['world_size']} workers at ZeRO-{meta['zero_stage']} -> "
              f"{world_size} at ZeRO-{zero_stage}) through a universal checkpoint", flush=True)
    uni = reshard(path, timeout_s=timeout_s, workers=workers, chaos_delay_s=chaos_delay_s, announce=rank == 0)
    return uni, True


# ---------------------------------------------------------------------------------------- the converter


def _heartbeat(lease: Path, gen: int, state: dict[str, Any], stop) -> None:
    """Rewrite the lease every HEARTBEAT_S; exit the process if a newer generation took over."""
    newer = lease.with_name(f"lease.{gen + 1:04d}")
    while not stop.wait(HEARTBEAT_S):
        if newer.exists():
            print(f"superseded by {newer.name}: exiting", flush=True)
            os._exit(3)
        state["beat"] += 1
        try:
            _write_json(lease, dict(state))  # dict(): a consistent copy while the converter updates it
        except OSError as e:  # a missed beat is harmless; TTL is many beats
            print(f"heartbeat failed: {e}", flush=True)


def convert(path: Path, uni: Path, gen: int, workers: int, chaos_delay_s: float = 0.0) -> None:
    """The converter process (started by :func:`reshard`): ds_to_universal with its work
    items (one per ZeRO rank file, then one per parameter) skipped when a previous attempt finished them."""
    import argparse
    import threading
    from concurrent.futures import ProcessPoolExecutor, as_completed

    lease = uni / f"lease.{gen:04d}"
    state = _read_json(lease) or {"gen": gen}
    state.update(state="converting", beat=1, pid=os.getpid(), phase="loading")
    _write_json(lease, state)
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(lease, gen, state, stop), daemon=True).start()
    try:
        import deepspeed.checkpoint.ds_to_universal as d2u

        marks = uni / "done"
        marks.mkdir(exist_ok=True)
        workers = workers or min(16, os.cpu_count() or 1)
        phases = iter(["extract", "merge"])

        def resumable(do_work, chunks, num_workers):
            # ds_to_universal's main() calls this once per phase; each work item is independent and
            # rewrites its own output files, so re-running an unfinished one is safe.
            import hashlib

            phase = next(phases, "other")
            chunks = list(chunks)
            keys = [hashlib.sha1(repr(c[0] if phase == "merge" and isinstance(c, tuple) else c).encode()).hexdigest()[:20]
                    for c in chunks]
            results: list[Any] = [None] * len(chunks)
            todo = []
            for i, k in enumerate(keys):
                done = _read_json(marks / f"{phase}-{k}.json")
                if done is not None:
                    results[i] = done["result"]
                else:
                    todo.append(i)
            state.update(phase=phase, total=len(chunks), done=len(chunks) - len(todo))
            print(f"{phase}: {len(chunks)} items, {len(chunks) - len(todo)} already done by an earlier attempt", flush=True)
            if phase == "merge" and chaos_delay_s:
                print(f"chaos testing: sleeping {chaos_delay_s} s", flush=True)
                time.sleep(chaos_delay_s)

            def finish(i, r):
                results[i] = r
                _write_json(marks / f"{phase}-{keys[i]}.json", {"result": sorted(r) if isinstance(r, set) else r})
                state["done"] += 1

            if num_workers > 1 and len(todo) > 1:
                with ProcessPoolExecutor(max_workers=num_workers) as ex:
                    futs = {ex.submit(do_work, chunks[i]): i for i in todo}
                    for f in as_completed(futs):
                        finish(futs[f], f.result())
            else:
                for i in todo:
                    finish(i, do_work(chunks[i]))
            return results

        d2u._do_parallel_work = resumable
        args = argparse.Namespace(input_folder=str(path / DS_TAG), output_folder=str(uni / DS_TAG),
                                  num_extract_workers=workers, num_merge_workers=max(1, workers // 2),
                                  keep_temp_folder=False, strict=True, inject_missing_state=True)
        d2u.main(args)
        stop.set()
        (uni / DONE).write_text(json.dumps({"gen": gen, "seconds": time.time() - state.get("started", time.time())}))
        state.update(state="done", phase="done")
        _write_json(lease, state)
    except BaseException as e:
        stop.set()
        state.update(state="failed", error=f"{type(e).__name__}: {e}"[:2000])
        _write_json(lease, state)
        raise


def to_universal(path: str | os.PathLike, *, timeout_s: float = 3600.0, workers: int | None = None) -> Path:
    """Convert checkpoint ``path`` to a universal one (``<path>/universal``) in this process's caller: the
    same protocol as a resuming group, for converting ahead of time. Idempotent."""
    return reshard(path, timeout_s=timeout_s, workers=workers)


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="polyko checkpoint converter (started by reshard)")
    p.add_argument("--convert", required=True)
    p.add_argument("--universal", required=True)
    p.add_argument("--gen", type=int, required=True)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--chaos-delay-s", type=float, default=0.0)
    a = p.parse_args(argv)
    convert(Path(a.convert), Path(a.universal), a.gen, a.workers, a.chaos_delay_s)
    return 0

