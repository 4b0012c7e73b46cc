"""Pretraining checkpoints: DeepSpeed engine state + a metadata file that commits it.

Layout of one checkpoint (Ray Train merges every rank's files into ``<run>/step_XXXXXX``)::

    ds/mp_rank_00_model_states.pt              DeepSpeed: module weights (+ optimizer state at ZeRO-0)
    ds/*zero_pp_rank_R_mp_rank_00_optim_states.pt   one per data-parallel rank at ZeRO 1-3
    polyko_checkpoint.json                     written LAST by rank 0: step, tokens seen, data position,
                                               world size, ZeRO stage, precision, config, and the size of
                                               every file of every rank

A checkpoint is valid only if its metadata parses and every listed file exists with the listed size;
an incomplete or corrupt one (crash during upload, truncated file) is skipped with a warning in favour
of the previous one. Checkpoints saved by ``w`` workers load on ``w`` workers directly; on another
worker count a ZeRO 1-3 (or bf16) checkpoint is first converted to a DeepSpeed *universal*
checkpoint (``ds_to_universal``) and loaded with ``load_universal`` -- a ZeRO-0 fp32 one loads anywhere.

RNG: the train loop reseeds from ``(seed, step, rank)`` each step, so the random state is a function of
the step and needs no saving (recorded as ``rng`` in the metadata).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

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


def to_universal(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert checkpoint ``path`` (its ``ds`` tag) to a universal checkpoint ``out_dir/ds``; idempotent
    (a finished conversion leaves ``out_dir/DONE``). Cost: reads and rewrites the fp32 state once."""
    out = Path(out_dir)
    if (out / "DONE").is_file():
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(Path(path) / DS_TAG),
           "--output_folder", str(out / DS_TAG), "--inject_missing_state",
           "--num_extract_workers", "1", "--num_merge_workers", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise CheckpointError(f"ds_to_universal failed for {path}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    (out / "DONE").write_text("ok")
    return out


def universal_cache_dir(path: str | os.PathLike) -> Path:
    """Node-local place for the universal copy of a checkpoint (keyed by its path)."""
    import hashlib

    key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "polyko-universal" / key
