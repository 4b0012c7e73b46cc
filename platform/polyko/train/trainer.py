"""``pretrain(cfg)``: run GPT-NeoX pretraining on Ray Train + DeepSpeed and export the result.

The driver decides everything it can before any worker starts (:func:`deploy`): the inputs (``data.path``
defaults to the tokens the user prepared, ``data.tokenizer`` to the one the manifest records), what the Ray
cluster has (its nodes' GPUs and accelerator type, never the driver's own devices: ``ray job submit`` drivers
run on a CPU head), GPUs or CPUs, the worker count (one per GPU unless given), the memory plan (GPU memory, or
host RAM per CPU worker) that gates the run and picks its ZeRO stage and micro-batch, at the smallest worker
count of an elastic range. It then opens (or continues) the MLflow ``pretrain`` run and runs
``polyko.train.loop.train_loop`` on the workers under ``TorchTrainer``; Ray Train restarts a failed or hung
worker group from the newest checkpoint up to ``fault.max_failures`` times. The run directory and MLflow run
are named by the run's identity (:func:`run_identity`: model, data, tokenizer, optimizer, batch, seed), so
re-running with other worker counts, steps, checkpoint cadence or fault settings continues the same run. At
the end the last checkpoint is exported to ``<output>/hf`` on a node with the memory for it.

CPU: ``pretrain(PretrainConfig(data=DataConfig(path="out/tokens"), steps=20))`` or
``python jobs/pretrain.py --size tiny --data out --steps 20``; ``python jobs/pretrain.py --dry-run`` prints
:meth:`Deployment.render` and exits.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from polyko import tracking
from polyko.config import config_hash, to_dict
from polyko.train import checkpoint as ckpt_io
from polyko.train.config import CPU_WORKERS, BatchLayout, PretrainConfig

DATA_ENV = "POLYKO_DATA"  # the packed tokens every run uses unless --data says otherwise (set once per cluster)
# Where the data jobs write tokens under the work dir: `jobs/prepare_data.py --output <work dir>/data
# --tokenizer ...` and `jobs/quickstart.py` (<work dir>/quickstart/data/tokens).
DATA_DEFAULTS = ("data/tokens", "quickstart/data/tokens")
BILLION = 1_000_000_000  # sizes from here up train on GPUs only (12.8b in fp32 is 52 GB per CPU worker)
# Sustained aggregate write rate of the shared checkpoint storage assumed by the dry run's estimates, GB/s
# (EFS/FSx/NFS-class volumes sustain ~1-10 GB/s; the runs' `checkpoint_seconds` metric measures yours).
STORAGE_GBPS = 2.0


@dataclass
class PretrainResult:
    export_dir: Path | None      # HF model dir (None when cfg.export is False)
    run_id: str                  # MLflow pretrain run
    final_loss: float | None
    checkpoint_dir: Path | None  # the last valid checkpoint (step_XXXXXX)
    steps: int                   # optimizer steps completed
    output: Path                 # the run directory


# ------------------------------------------------------------------------------------------- inputs


def default_data() -> str:
    """The packed tokens a run uses without ``--data``: ``$POLYKO_DATA``, else the one committed token dataset
    under the work dir (:data:`DATA_DEFAULTS`, then any ``<work dir>/*/tokens``). ValueError naming where it
    looked when there is none, or several to choose from."""
    from polyko.data.shards import MANIFEST
    from polyko.train.data import resolve_tokens_dir

    env = os.environ.get(DATA_ENV)
    if env:
        return resolve_tokens_dir(env)
    wd = tracking.work_dir()
    for rel in DATA_DEFAULTS:
        if (wd / rel / MANIFEST).is_file():
            return str(wd / rel)
    found = sorted({str(m.parent) for pattern in (f"*/tokens/{MANIFEST}", f"*/*/tokens/{MANIFEST}")
                    for m in wd.glob(pattern)})
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(f"several token datasets under the work dir {wd}: {', '.join(found)}; pick one with "
                         f"--data DIR (or ${DATA_ENV})")
    raise ValueError(f"no packed tokens found: --data not given, ${DATA_ENV} not set, and no committed token "
                     f"dataset under the work dir {wd} (looked in {', '.join(str(wd / r) for r in DATA_DEFAULTS)} "
                     f"and {wd}/*/tokens). Make one with `python jobs/prepare_data.py --output {wd / 'data'} "
                     f"--tokenizer TOKENIZER_DIR`, or pass --data DIR")


def resolve_inputs(cfg: PretrainConfig) -> PretrainConfig:
    """``cfg`` with ``data.path`` (default :func:`default_data`) and ``data.tokenizer`` (default: the
    ``tokenizer_dir`` the token manifest records) filled in. A ``--tokenizer`` given is checked against the
    manifest's ``tokenizer_hash`` later (:func:`preflight`)."""
    from polyko.data.shards import read_manifest
    from polyko.train.data import resolve_tokens_dir

    path = cfg.data.path or default_data()
    tokenizer = cfg.data.tokenizer
    if not tokenizer:
        manifest = read_manifest(resolve_tokens_dir(path))
        tokenizer = manifest.get("tokenizer_dir")
        if not tokenizer:
            raise ValueError(f"the token manifest of {path} records no tokenizer_dir (made by an older pipeline): "
                             "pass --tokenizer DIR, the tokenizer the tokens were made with")
        if not Path(tokenizer).is_dir():
            raise ValueError(f"the tokens {path} were made with the tokenizer {tokenizer}, which is not on this "
                             "machine (keep it on shared storage, as the tokens): pass --tokenizer DIR")
    return replace(cfg, data=replace(cfg.data, path=path, tokenizer=tokenizer))


# ---------------------------------------------------------------------------------------- identity


def run_identity(cfg: PretrainConfig) -> dict[str, Any]:
    """What defines a run's trajectory: model, data (its manifest hash: moved data is the same data),
    tokenizer (content hash), optimizer, global batch, precision, seed, DeepSpeed extras and the starting
    point. Not in it (a change continues the same run): worker counts and scaling, steps, checkpoint cadence
    and retention, fault settings, ZeRO stage and micro-batch (memory layouts of the same maths: a resume
    reshards), activation checkpointing (recomputation), output and run names.

    Steps: the learning rate is a function of ``(step, steps)`` (``config.lr_at``), so extending ``steps``
    stretches the cosine (or moves WSD's decay) from the resume step on; the default warmup (1% of steps) is
    long over and is recorded as such, not as a number."""
    from polyko.train.data import manifest_hash, tokenizer_hash

    r = cfg.resolved()
    optim = asdict(r.optim)
    if cfg.optim.warmup_steps is None or optim["warmup_steps"] == max(1, r.steps // 100):
        optim["warmup_steps"] = "1% of steps"
    ident = {"model": {"size": r.model.size, "init_from": r.model.init_from, "init": r.model.init},
             "data": {"manifest": manifest_hash(r.data.path), "tokenizer": tokenizer_hash(r.data.tokenizer),
                      "shuffle": r.data.shuffle},
             "optim": optim, "global_batch_tokens": r.batch.global_batch_tokens,
             "precision": r.deepspeed.precision, "deepspeed_extra": r.deepspeed.extra_json, "seed": r.seed,
             "resume_from": r.checkpoint.resume_from}
    if r.scaling.simulate_gpus:  # never share a run (and its checkpoints) with the real GPU run
        ident["simulated_gpus"] = True
    # Recorded only when set, so the runs that predate them keep their names.
    if r.data.mixture:  # the global sample order is a function of the source weights
        ident["data"]["mixture"] = dict(sorted(r.data.mixture.items()))
    if r.model.parametrization != "standard":
        ident["model"]["parametrization"] = r.model.parametrization
    if r.guard.z_loss:
        ident["z_loss"] = r.guard.z_loss
    return ident


def run_paths(cfg: PretrainConfig) -> tuple[Path, str]:
    """``(output dir, run name)`` of a config: both named by :func:`run_identity`'s hash unless given."""
    h = config_hash(run_identity(cfg))
    out = Path(cfg.output) if cfg.output else tracking.work_dir() / "pretrain" / h
    return out.resolve(), cfg.run_name or f"pretrain-{cfg.model.size}-{h}"


# ---------------------------------------------------------------------------------------- checks


def preflight(cfg: PretrainConfig) -> int:
    """Driver-side checks (ValueError with a clear message); returns the data's seq_len."""
    from polyko.train.data import open_tokens

    if not cfg.data.path or not cfg.data.tokenizer:
        raise ValueError("data.path (--data) and data.tokenizer (--tokenizer) are required here "
                         "(pretrain fills them from the prepared tokens: polyko.train.trainer.resolve_inputs)")
    tokens = open_tokens(cfg.data.path, cfg.data.tokenizer)
    if cfg.data.mixture:  # unknown sources or bad weights fail here, before any worker starts
        from polyko.train.data import make_sampler

        make_sampler(cfg.data.path, cfg.seed, shuffle=cfg.data.shuffle, mixture=cfg.data.mixture)
    workers = cfg.scaling.ray_num_workers()
    lo, hi = workers if isinstance(workers, tuple) else (workers, workers)
    for w in {lo, hi}:  # every count in between lies between these two (BatchLayout takes any 1 <= w <= G)
        BatchLayout.derive(cfg.batch.global_batch_tokens, tokens.seq_len, w, cfg.batch.micro_batch)
    if cfg.model.init_from and not (Path(cfg.model.init_from) / "config.json").is_file():
        raise ValueError(f"--init-from {cfg.model.init_from}: not an HF checkpoint dir (no config.json)")
    return tokens.seq_len


# polyko.plan GPU key -> the Ray accelerator type a node group of that GPU declares (ray.util.accelerators).
RAY_ACCELERATOR = {"a100-40gb": "A100-40G", "a100-80gb": "A100-80G", "h100": "H100", "h100-pcie": "H100",
                   "h100-nvl": "H100", "h200": "H200"}


def plan_gpu(name: str) -> str:
    """A ``polyko.plan`` GPU key from a plan key or a Ray accelerator type ("H100", "A100-80G", ...)."""
    from polyko.plan import PEAK_TFLOPS

    n = name.strip()
    if n.lower() in PEAK_TFLOPS:
        return n.lower()
    ray_types = {"A100-40G": "a100-40gb", "A100-80G": "a100-80gb", "H100": "h100", "H200": "h200",
                 "A100": "a100-40gb"}  # NVML names every A100 "A100": plan the 40 GB one unless told (or probed)
    if n in ray_types:
        return ray_types[n]
    raise ValueError(f"no memory plan for GPU {name!r}: pass --gpu TYPE with the closest of "
                     f"{', '.join(PEAK_TFLOPS)} (memory and peak FLOP/s are what the plan needs)")


def _probe_a100(accelerator: str) -> str | None:
    """A real ``A100`` node's memory decides 40 vs 80 GB: one GPU task there (60 s at most); None if not told."""
    import ray

    @ray.remote(num_gpus=1, resources={f"accelerator_type:{accelerator}": 0.001})
    def probe() -> str:
        from polyko.plan import detect_accelerator

        return detect_accelerator()[0]

    try:
        got = ray.get(probe.remote(), timeout=60)
    except Exception:  # noqa: BLE001 - GPUs busy, or nothing answers: stay conservative
        return None
    return got if got in ("a100-40gb", "a100-80gb") else None


# -------------------------------------------------------------------------------------- deployment


@dataclass
class Deployment:
    """What a run does where, decided on the driver before any worker starts (``--dry-run`` prints it)."""

    cfg: PretrainConfig                   # resolved: what the workers run (the plan's ZeRO stage and micro-batch)
    seq_len: int
    inventory: Any                        # polyko.cluster.Inventory at decision time
    gpu: str | None                       # the plan's GPU key; None on CPU workers
    accelerator: str | None               # Ray accelerator type the workers are scheduled on
    plan: Any                             # polyko.plan.Plan (GPUs) or CpuPlan
    output: Path
    run_name: str
    checkpoints: int                      # checkpoints the run directory already has (> 0: this continues it)
    placement: dict[str, int] | None = None  # node -> workers, from a real Ray placement group (dry run)
    notes: list[str] = field(default_factory=list)

    @property
    def workers(self) -> tuple[int, int]:
        w = self.cfg.scaling.ray_num_workers()
        return w if isinstance(w, tuple) else (w, w)

    def layout(self, workers: int) -> BatchLayout:
        return BatchLayout.derive(self.cfg.batch.global_batch_tokens, self.seq_len, workers, self.cfg.batch.micro_batch)

    @property
    def params(self) -> int:
        return self.plan.params

    @property
    def checkpoint_bytes(self) -> int:
        """DeepSpeed checkpoint: module weights in the training dtype + the optimizer's fp32 state (Adam's two
        moments, plus the fp32 master copy of the weights at ZeRO >= 1 or in bf16)."""
        bf16 = self.cfg.deepspeed.precision == "bf16"
        weights = 2 if bf16 else 4
        optim = 12 if bf16 or self.cfg.deepspeed.zero_stage >= 1 else 8
        return (weights + optim) * self.params

    @property
    def reshard_bytes(self) -> int:
        """Bytes moved by a resharding (another worker count, ZeRO >= 1): read the checkpoint, write the universal
        one (fp32 weights + two moments, 12 B/param), read that back at load. ZeRO-0 loads anywhere: 0."""
        if self.cfg.deepspeed.zero_stage == 0:
            return 0
        return self.checkpoint_bytes + 2 * 12 * self.params

    def render(self) -> str:
        cfg, sc = self.cfg, self.cfg.scaling
        lo, hi = self.workers
        kind = (f"{self.gpu} GPUs (Ray accelerator_type {self.accelerator or 'any'})" if self.gpu else "CPU workers")
        if sc.simulate_gpus:
            kind += ", SIMULATED: compute on CPU/gloo"
        lines = [f"polyko deployment: {cfg.model.size} ({self.params:,} parameters) on {kind}",
                 f"  {'cluster':<24}{self.inventory.describe()}",
                 f"  {'workers':<24}" + (f"{lo} (fixed)" if lo == hi else
                                         f"elastic {lo}..{hi}, memory planned at {lo} (the smallest)")]
        if self.placement:
            where = ", ".join(f"{node}: {n}" for node, n in sorted(self.placement.items()))
            lines.append(f"  {'workers per node':<24}{where} (a real Ray placement group of {sum(self.placement.values())} "
                         f"workers, PACK, reserved and released)")
        for w in sorted({lo, hi}):
            lay = self.layout(w)
            lines.append(f"  {f'batch at {w} workers':<24}{lay.global_batch} seqs x {self.seq_len} tokens: "
                         f"micro-batch <= {lay.micro_batch} x {lay.grad_accum} accumulation per worker"
                         + ("" if lay.even else f" (uneven: {lay.count(w - 1)}-{lay.count(0)} seqs per worker)"))
        lines.append(f"  {'ZeRO stage':<24}{cfg.deepspeed.zero_stage}, {cfg.deepspeed.precision}, activation "
                     f"checkpointing {'on' if cfg.model.activation_checkpointing else 'off'}")
        ck, gbps = self.checkpoint_bytes, STORAGE_GBPS
        write_s = ck / (gbps * 1e9)
        line = (f"{ck / 1e9:,.1f} GB every {cfg.checkpoint.every_steps} steps (keep {cfg.checkpoint.keep}), "
                f"~{write_s:,.0f} s to write at {gbps:g} GB/s (assumed shared-storage rate)")
        tps = getattr(self.plan, "tokens_per_s", None)
        if tps:
            step_s = cfg.batch.global_batch_tokens / tps
            line += f"; {write_s / (write_s + cfg.checkpoint.every_steps * step_s):.1%} of the run's time"
        lines.append(f"  {'checkpoint':<24}{line}")
        rb = self.reshard_bytes
        lines.append(f"  {'resharding':<24}" + (f"after a worker-count change: ~{rb / 1e9:,.0f} GB read+written, "
                                                 f"~{rb / (gbps * 1e9):,.0f} s at {gbps:g} GB/s, once per change"
                                                 if rb else "none (ZeRO-0 checkpoints load at any worker count)"))
        lines.append(f"  {'run':<24}{self.run_name} in {self.output}"
                     + (f" (continues: {self.checkpoints} checkpoint(s))" if self.checkpoints else " (new)"))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines + ["", self.plan.render()])


def _scaling(cfg: PretrainConfig, inv, g: int) -> tuple[PretrainConfig, str | None, str | None, list[str]]:
    """GPUs or CPUs, the plan's GPU key, the Ray accelerator type and the worker counts, from the cluster."""
    sc, notes = cfg.scaling, []
    if sc.simulate_gpus and not inv.simulated:
        raise ValueError("scaling.simulate_gpus (--simulated-gpus) computes on CPU while reserving GPUs: it runs only "
                         "on a simulated cluster (python -m polyko.simcluster), and this cluster is not one "
                         f"({inv.describe()})")
    if sc.simulate_gpus and sc.use_gpu is False:
        raise ValueError("scaling.simulate_gpus plans and schedules a GPU run: it cannot be combined with use_gpu=False")
    gpu_run = sc.use_gpu if sc.use_gpu is not None else bool(inv.gpus or sc.gpu_type or sc.simulate_gpus)
    key = accelerator = None
    if gpu_run:
        types = [t for t in inv.accelerators if t != "unknown"]
        if sc.gpu_type:
            key = plan_gpu(sc.gpu_type)
            matching = [t for t in types if plan_gpu(t) == key or (t == "A100" and key.startswith("a100"))]
            if types and not matching:
                raise ValueError(f"--gpu {sc.gpu_type}: the cluster's GPU nodes are {', '.join(types)}")
            # No such node up yet (GPU groups autoscaled from zero): ask for Ray's exact type, which the node
            # groups declare (cluster/), so the autoscaler brings up that group and no other GPU kind.
            accelerator = matching[0] if matching else RAY_ACCELERATOR[key]
        elif len(types) == 1:
            accelerator = types[0]
            key = plan_gpu(accelerator)
            if accelerator == "A100" and not inv.simulated:
                key = _probe_a100(accelerator) or key
                if key == "a100-40gb":
                    notes.append("Ray names every A100 'A100': planned for 40 GB; --gpu a100-80gb if yours have 80")
        elif len(types) > 1:
            raise ValueError(f"the cluster has several GPU types ({', '.join(types)}): pick one with --gpu TYPE")
        else:
            raise ValueError("a GPU run, but no GPU node in the cluster reports its accelerator type (GPU groups "
                             f"autoscaled from zero have none yet; {inv.describe()}): pass --gpu TYPE (e.g. "
                             "a100-80gb, h100) and the worker count (--num-workers, or --min/--max-workers)")
    available = inv.gpus_of(accelerator) if gpu_run else 0
    if sc.elastic:
        lo = sc.min_workers if sc.min_workers is not None else 1
        hi = sc.max_workers
        if hi is None:
            hi = max(lo, available) if gpu_run else max(lo, CPU_WORKERS)
            if hi > g:
                notes.append(f"elastic max capped at the global batch's {g} sequences (one per worker at least)")
                hi = max(lo, g)
        n = None
    else:
        lo = hi = n = sc.num_workers if sc.num_workers is not None else (available if gpu_run else CPU_WORKERS)
        if n == 0:
            raise ValueError(f"a GPU run, but the cluster has no {accelerator or 'GPU'} GPUs now ({inv.describe()}; "
                             "autoscaling from zero?): pass the worker count (--num-workers or --min/--max-workers)")
    if gpu_run and hi > available:
        notes.append(f"asks for up to {hi} GPUs, the cluster has {available} now: Ray waits for the autoscaler")
    scaling = replace(sc, use_gpu=gpu_run, num_workers=n if n is not None else sc.num_workers,
                      min_workers=lo if sc.elastic else None, max_workers=hi if sc.elastic else None)
    return replace(cfg, scaling=scaling), key, accelerator, notes


def _host_memory_gib(inv, cpus_per_worker: int, workers: int) -> float:
    """Host RAM one CPU worker can count on: the smallest, over nodes with worker slots, of the node's Ray memory
    over the workers that can land there (its slots, at most ``workers``)."""
    per = [n.memory_bytes / min(workers, int(n.cpus // max(1, cpus_per_worker))) for n in inv.nodes
           if n.cpus >= max(1, cpus_per_worker)]
    return min(per) / 2**30 if per else 0.0


def deploy(cfg: PretrainConfig, *, ray_address: str | None = None, place: bool = False) -> Deployment:
    """Join the cluster and decide the run (ValueError with the plan when it cannot run). ``place``: also
    reserve the workers' resources in a placement group to report the real placement (released at once)."""
    from polyko.cluster import init_ray, inventory
    from polyko.plan import make_cpu_plan, make_plan
    from polyko.train.data import open_tokens

    raw = resolve_inputs(cfg)
    seq_len = open_tokens(raw.data.path, raw.data.tokenizer).seq_len
    init_ray(ray_address)
    inv = inventory()
    g = raw.resolved().batch.global_batch_tokens // seq_len
    scaled, key, accelerator, notes = _scaling(raw, inv, g)
    cfg = scaled.resolved()
    lo = cfg.scaling.ray_num_workers()
    lo = lo[0] if isinstance(lo, tuple) else lo
    size = cfg.model.size
    if key is not None:
        plan = make_plan(size, gpus=lo, gpu=key, seq_len=seq_len, global_batch_tokens=cfg.batch.global_batch_tokens,
                         zero_stage=raw.deepspeed.zero_stage, micro_batch=raw.batch.micro_batch,
                         activation_checkpointing=bool(cfg.model.activation_checkpointing),
                         stages=(1, 2, 3) if cfg.deepspeed.precision == "bf16" else (0, 1, 2, 3))
        if not plan.fits:
            at = f"{lo} workers" + (" (the smallest of the elastic range)" if cfg.scaling.elastic else "")
            raise ValueError(f"{size} does not fit on {at} x {key} (ZeRO-{plan.zero_stage}, micro-batch "
                             f"{plan.micro_batch}); add GPUs or raise --min-workers\n" + plan.render())
        cfg = replace(cfg, deepspeed=replace(cfg.deepspeed, zero_stage=plan.zero_stage),
                      batch=replace(cfg.batch, micro_batch=plan.micro_batch))
    else:
        plan = make_cpu_plan(size, workers=lo, host_memory_gib=_host_memory_gib(inv, cfg.scaling.cpus_per_worker, lo),
                             seq_len=seq_len, micro_batch=cfg.batch.micro_batch, zero_stage=raw.deepspeed.zero_stage)
        if plan.params >= BILLION:
            raise ValueError(f"{size} has {plan.params / 1e9:.1f}B parameters: it trains on GPUs, not on CPU workers "
                             f"({inv.describe()}). Run it on a GPU cluster (or pass --gpu TYPE where GPU nodes "
                             f"autoscale); plan one with `python -m polyko.plan --size {size} --gpus N --gpu h100`\n"
                             + plan.render())
        if not plan.fits:
            raise ValueError(f"{size} does not fit in host RAM on {lo} CPU workers\n" + plan.render())
        cfg = replace(cfg, deepspeed=replace(cfg.deepspeed, zero_stage=plan.zero_stage))
    if cfg.scaling.simulate_gpus:  # reserve the simulated GPUs, compute on CPU (the loop's use_gpu=False path)
        cfg = replace(cfg, scaling=replace(cfg.scaling, use_gpu=False))
    cfg = cfg.resolved()
    preflight(cfg)
    from polyko.train.evaluator import resolve_enabled

    kobest, note = resolve_enabled(cfg.eval.kobest)  # KoBEST during training: on when its data is at hand
    cfg = replace(cfg, eval=replace(cfg.eval, kobest=kobest))
    if note:
        notes.append(note)
    if kobest.enabled and not kobest.num_gpus and plan.params >= BILLION:
        # The evaluation exports the checkpoint and runs lm-eval in its own task: on a CPU slot that is hours at
        # this size. It never blocks training, but the scores would come long after their checkpoints.
        notes.append(f"KoBEST per checkpoint runs on a CPU slot: for {size} give it a GPU left free by training "
                     "(--set eval.kobest.num_gpus=1), or --set eval.kobest.enabled=false")
    out, run_name = run_paths(replace(scaled, scaling=cfg.scaling, deepspeed=replace(
        scaled.deepspeed, precision=cfg.deepspeed.precision)))
    d = Deployment(cfg=cfg, seq_len=seq_len, inventory=inv, gpu=key, accelerator=accelerator, plan=plan, output=out,
                   run_name=run_name, checkpoints=len(ckpt_io.list_checkpoints(out / "ray" / run_name)), notes=notes)
    if place:
        d.placement = _place(d)
    return d


def _gpu_request(d: Deployment) -> bool:
    return bool(d.cfg.scaling.use_gpu or d.cfg.scaling.simulate_gpus)


def _place(d: Deployment) -> dict[str, int] | None:
    """Reserve the workers' bundles as Ray Train would (PACK) and report node -> workers; None when the cluster
    cannot hold them now (never waits for an autoscaler: a dry run must not buy nodes)."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    lo, hi = d.workers
    bundle = {"CPU": d.cfg.scaling.cpus_per_worker}
    if _gpu_request(d):
        bundle["GPU"] = 1
        if d.accelerator:
            bundle[f"accelerator_type:{d.accelerator}"] = 0.001
    avail = ray.available_resources()
    n = min(hi, min(int(avail.get(k, 0) // v) for k, v in bundle.items()))
    if n < lo:
        d.notes.append(f"placement not reserved: the cluster has room for {n} workers now, the run needs {lo}")
        return None
    pg = placement_group([dict(bundle) for _ in range(n)], strategy="PACK")
    try:
        if not pg.wait(timeout_seconds=60):
            d.notes.append("placement not reserved within 60 s")
            return None
        by_id = {node.node_id: f"{node.ip} ({node.node_id[:8]}, {node.gpus:g} GPUs)" for node in d.inventory.nodes}
        out: dict[str, int] = {}
        for node_id in placement_group_table(pg)["bundles_to_node_id"].values():
            name = by_id.get(node_id, node_id[:8])
            out[name] = out.get(name, 0) + 1
        return out
    finally:
        remove_placement_group(pg)


def _open_run(cfg: PretrainConfig, out: Path, run_name: str):
    """The MLflow run of this run directory: the one its marker names when it still exists (a continuation:
    this attempt's scaling/steps/fault settings become tags; params stay those of the first attempt), else new."""
    import contextlib

    import mlflow
    from mlflow.tracking import MlflowClient

    from polyko.train.data import resolve_tokens_dir

    marker = tracking.read_marker(out)
    uri = tracking.tracking_uri()
    if marker and marker.get("stage") == "pretrain" and marker.get("tracking_uri") == uri:
        try:
            prev = MlflowClient(tracking_uri=uri).get_run(marker["run_id"])
        except Exception:  # noqa: BLE001 - deleted or another store: start a new one
            prev = None
        if prev is not None and prev.info.lifecycle_stage == "active":
            mlflow.set_tracking_uri(uri)

            @contextlib.contextmanager
            def resumed():
                with mlflow.start_run(run_id=prev.info.run_id) as run:
                    n = int(prev.data.tags.get("polyko.attempts", "1")) + 1
                    mlflow.set_tags({"polyko.attempts": str(n), f"polyko.attempt.{n}": json.dumps(
                        {"steps": cfg.steps, "scaling": to_dict(cfg.scaling), "fault": to_dict(cfg.fault),
                         "checkpoint": to_dict(cfg.checkpoint)})[:5000]})
                    yield run
            return resumed()
    parents = tracking.lineage(resolve_tokens_dir(cfg.data.path), cfg.data.tokenizer)
    return tracking.start_run("pretrain", cfg, output=out, parents=parents, run_name=run_name)


def pretrain(cfg: PretrainConfig, *, ray_address: str | None = None) -> PretrainResult:
    """Train, checkpoint, export. Joins ``ray_address``/``$RAY_ADDRESS`` or starts a local cluster."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from polyko.train.loop import train_loop
    from polyko.train.metrics import read_jsonl

    d = deploy(cfg, ray_address=ray_address)
    cfg, out, run_name = d.cfg, d.output, d.run_name
    if d.inventory.simulated and d.gpu and not cfg.scaling.simulate_gpus:
        raise ValueError(f"the plan fits, but this cluster's GPUs are simulated (polyko.simcluster: "
                         f"{d.inventory.describe()}): --dry-run shows what would run where, --simulated-gpus "
                         "trains on CPU while reserving them\n" + d.render())
    print(d.render(), flush=True)
    out.mkdir(parents=True, exist_ok=True)

    with _open_run(cfg, out, run_name) as run:
        print(f"[polyko] pretrain run {run_name}: {tracking.run_url(run)}; output {out}", flush=True)
        sc = cfg.scaling
        extra = {"accelerator_type": d.accelerator} if d.accelerator and _gpu_request(d) else {}
        from polyko.train import evaluator
        from polyko.train.guard import EVENTS_FILE, RETENTION_SCORE, GuardStopped

        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"config": to_dict(cfg), "output": str(out), "run_name": run_name,
                               "run_id": run.info.run_id, "tracking_uri": tracking.tracking_uri(),
                               "checkpoint_root": str(out / "ray" / run_name)},
            torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo", timeout_s=cfg.fault.hang_timeout_s),
            scaling_config=ray.train.ScalingConfig(num_workers=sc.ray_num_workers(), use_gpu=_gpu_request(d),
                                                   resources_per_worker={"CPU": sc.cpus_per_worker}, **extra),
            run_config=ray.train.RunConfig(
                name=run_name, storage_path=str(out / "ray"),
                # Kept: the `keep` highest-scored, i.e. the newest healthy ones (unhealthy score -1), so a bad
                # streak never deletes the rollback target (polyko.train.guard.health_score).
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep,
                                                             checkpoint_score_attribute=RETENTION_SCORE,
                                                             checkpoint_score_order="max"),
                failure_config=ray.train.FailureConfig(max_failures=cfg.fault.max_failures)),
            # KoBEST on checkpoints in its own Ray task, retried, re-queued after a restart; never waited on.
            validation_config=evaluator.validation_config(cfg.eval.kobest, run_id=run.info.run_id,
                                                          tracking_uri=tracking.tracking_uri()),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        events = out / EVENTS_FILE
        report = json.loads(events.read_text()) if events.is_file() else None
        if report and str(report.get("reason", "")).startswith("stopped"):
            # The guard ended the run (returned normally, so Ray Train did not retry it): fail with its report.
            raise GuardStopped(report)

        found = ckpt_io.select(result.checkpoint.path) if result.checkpoint is not None else None
        ckpt_dir, meta = found if found else (None, None)
        steps = meta["step"] if meta else 0
        history = read_jsonl(out / "metrics.jsonl")
        final_loss = history[steps]["loss"] if steps in history else (meta or {}).get("loss")
        run_id = run.info.run_id
    # The export is its own MLflow "checkpoint" run, linked to this pretrain run: start it after this one ends.
    export_dir = None
    if cfg.export and ckpt_dir is not None:
        from mlflow.tracking import MlflowClient

        from polyko.train.export import export_on_cluster

        export_dir = export_on_cluster(ckpt_dir, out / "hf", cfg.data.tokenizer)
        MlflowClient(tracking_uri=tracking.tracking_uri()).set_tag(run_id, "polyko.export", str(export_dir))
        print(f"[polyko] exported step {steps} to {export_dir}", flush=True)
    return PretrainResult(export_dir=export_dir, run_id=run_id, final_loss=final_loss,
                          checkpoint_dir=ckpt_dir, steps=steps, output=out)
