"""Export a pretraining checkpoint to a Hugging Face GPT-NeoX directory, in bounded memory.

``export_hf(step_dir, out_dir)`` streams the fp32 master weights out of the DeepSpeed files tensor by
tensor into sharded safetensors (``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``
like ``save_pretrained``, or one ``model.safetensors`` when it fits in one shard), fp32 or bf16
(``dtype``), plus ``config.json``, ``generation_config.json`` and the tokenizer, so
``AutoModelForCausalLM.from_pretrained(out_dir)``, lm-eval's ``hf`` model and ``jobs/serve.py`` load it.

Memory: the DeepSpeed files are memory-mapped (``torch.load(mmap=True)``) and never read whole. ZeRO 1-3:
each parameter is a list of slices of the ranks' flat fp32 partitions (the layout of
``deepspeed.utils.zero_to_fp32``, which instead concatenates whole partitions: 2x the model at ZeRO-2);
ZeRO-0: the tensors of the model-states file. Slices are copied to the output file in chunks of
``CHUNK_ELEMS`` and their pages dropped from the mapping right after (``madvise(MADV_DONTNEED)``), so the
export holds a few chunks at a time, never a copy of the model; no model is instantiated (a meta-device
``GPTNeoXForCausalLM`` gives the expected names and shapes: every weight accounted for, nothing extra).
``benchmarks/export_memory.py`` measures peak RSS / model fp32 bytes.

``export_on_cluster`` is what the pretraining driver calls: on a Ray cluster the export runs as a task
that reserves the memory it needs (so not on a CPU-less head), inline otherwise.

Run on a CPU (any saved step): ``python jobs/export.py --checkpoint RUN/step_000100 --output OUT``.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from polyko.train import checkpoint as ckpt_io

CHUNK_ELEMS = 1 << 22                  # 4 Mi elements (16 MiB fp32) copied per write
DEFAULT_SHARD_BYTES = 5 * 10**9        # save_pretrained's shard size
EXPORT_BASE_BYTES = 2 * 2**30          # interpreter + torch + transformers + tokenizer, before any weight
DTYPES = ("fp32", "bf16")
_ST_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int64": "I64", "int32": "I32",
             "uint8": "U8", "bool": "BOOL"}


@dataclass
class LazyTensor:
    """A checkpoint tensor not read yet: its shape, and 1-D slices of memory-mapped checkpoint files
    that concatenate to it (in order)."""
    shape: tuple[int, ...]
    pieces: list  # of 1-D torch tensors backed by an mmap of a checkpoint file
    # μP export: (head_dim, factor) multiplies the query rows of a GPT-NeoX query_key_value weight/bias
    # (per head [q, k, v] blocks of head_dim rows) by factor as it is written (polyko.sweep.mup)
    query_scale: tuple[int, float] | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def dtype(self):
        return self.pieces[0].dtype


# ------------------------------------------------------------------------------------- reading


def _load_mapped(f: Path) -> dict:
    import torch

    return torch.load(f, map_location="cpu", mmap=True, weights_only=False)


def _slices(parts: list, offset: int, numel: int) -> list:
    """Views of ``numel`` elements from ``offset`` of the virtual concatenation of 1-D ``parts``."""
    out, at = [], 0
    for p in parts:
        n = p.numel()
        if offset < at + n and numel > 0:
            a = max(0, offset - at)
            take = min(n - a, numel)
            out.append(p.narrow(0, a, take))
            offset += take
            numel -= take
        at += n
    assert numel == 0, f"ran {numel} elements past the end of the flat partitions"
    return out


def _flat(v):
    assert v.is_contiguous(), "checkpoint tensors are saved contiguous"  # a copy would not be file-backed
    return v.view(-1)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def checkpoint_tensors(step_dir: str | os.PathLike) -> dict[str, LazyTensor]:
    """``{name: LazyTensor}`` of a checkpoint's model (fp32 master weights at ZeRO 1-3, plus buffers and
    shared/frozen parameters), whatever its ZeRO stage and worker count. Reads only metadata."""
    from deepspeed.utils.zero_to_fp32 import get_model_state_files, get_optim_files

    step_dir = Path(step_dir)
    meta = ckpt_io.validate(step_dir)
    ds_dir = step_dir / meta["tag"]
    if not (meta["zero_stage"] >= 1 or meta.get("precision") == "bf16"):
        module = _load_mapped(ds_dir / "mp_rank_00_model_states.pt")["module"]
        return {k: LazyTensor(tuple(v.shape), [_flat(v)]) for k, v in module.items()}

    models = [_load_mapped(Path(f)) for f in get_model_state_files(str(ds_dir))]
    optims = [_load_mapped(Path(f))["optimizer_state_dict"] for f in get_optim_files(str(ds_dir))]
    stage = optims[0]["zero_stage"]
    world = optims[0]["partition_count"]
    world = max(world) if isinstance(world, list) else world
    if world != len(optims):
        raise ckpt_io.CheckpointError(f"{ds_dir}: {len(optims)} optimizer files for {world} ZeRO partitions")
    m0 = models[0]
    out: dict[str, LazyTensor] = {k: LazyTensor(tuple(v.shape), [_flat(v)]) for k, v in m0["module"].items()
                                  if k in m0["buffer_names"]}
    frozen = m0.get("frozen_param_shapes") or {}
    for name, shape in frozen.items():
        n = _numel(shape)
        frags = [_flat(m["frozen_param_fragments"][name]) for m in (models if stage == 3 else models[:1])]
        out[name] = LazyTensor(tuple(shape), _slices(frags, 0, n))

    if stage <= 2:
        flat = [o["single_partition_of_fp32_groups"] for o in optims]
        paddings = optims[0].get("param_alignment_paddings")
        for g, shapes in enumerate(m0["param_shapes"]):
            parts = [flat[r][g] for r in range(world)]
            total = sum(p.numel() for p in parts)
            off = 0
            for i, (name, shape) in enumerate(shapes.items()):
                n = _numel(shape)
                out[name] = LazyTensor(tuple(shape), _slices(parts, off, n))
                off += n + (paddings[g][i] if paddings is not None else 0)
            align = 2 * world  # ZeRO-1/2 pad each group to a multiple of 2 * world (as zero_to_fp32 checks)
            if -(-off // align) * align != -(-total // align) * align:
                raise ckpt_io.CheckpointError(f"{ds_dir}: group {g} holds {total} elements, its parameters {off}")
    else:
        flat = [o["fp32_flat_groups"] for o in optims]
        shapes = {k: v for d in m0["param_shapes"] for k, v in d.items()}
        off = 0
        for name, shape in shapes.items():
            n = _numel(shape)
            per = -(-n // world)  # each rank holds ceil(n / world) elements of every parameter (last padded)
            pieces, left = [], n
            for r in range(world):
                take = min(per, left)
                pieces += _slices(flat[r], off, take)
                left -= take
            out[name] = LazyTensor(tuple(shape), pieces)
            off += per
        total = sum(p.numel() for p in flat[0])
        if off != total:
            raise ckpt_io.CheckpointError(f"{ds_dir}: ZeRO-3 partitions hold {total} elements per rank, "
                                          f"the parameters {off}")
    for alias, source in m0.get("shared_params", {}).items():
        if source in out:
            out[alias] = out[source]
    return out


def consolidated_state_dict(step_dir: str | os.PathLike) -> dict:
    """fp32 ``{name: tensor}`` of a checkpoint's model, whole in memory (DeepSpeed's ``zero_to_fp32`` at
    ZeRO 1-3, the model-states file at ZeRO-0): the reference the streaming export is checked against."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    step_dir = Path(step_dir)
    meta = ckpt_io.validate(step_dir)
    ds_dir = step_dir / meta["tag"]
    if meta["zero_stage"] >= 1 or meta.get("precision") == "bf16":
        sd = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=meta["tag"])
    else:
        states = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        sd = states["module"]
    return {k: v.float().contiguous() for k, v in sd.items()}


# ------------------------------------------------------------------------------------- writing

_PAGE = mmap.PAGESIZE
_libc = None


def _drop_pages(t) -> None:
    """Drop the (clean, file-backed) pages under tensor ``t`` from this process: it was read from a private
    read-only mapping of a checkpoint file, so the kernel re-reads them should they be touched again."""
    global _libc
    if not sys.platform.startswith("linux"):
        return  # elsewhere the mapping's pages stay resident (reclaimable page cache) until the export ends
    import ctypes

    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    start = t.data_ptr() & ~(_PAGE - 1)
    end = (t.data_ptr() + t.numel() * t.element_size() + _PAGE - 1) & ~(_PAGE - 1)
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # 4 = MADV_DONTNEED


def _out_dtype(t: LazyTensor, dtype):
    return dtype if t.dtype.is_floating_point else t.dtype


def _scale_query_rows(chunk, start: int, t: LazyTensor):
    """``chunk`` (elements ``start...`` of ``t`` flattened, any dtype) with its query-row elements times
    ``t.query_scale``'s factor, as a new fp32 tensor (the mapped checkpoint is never written)."""
    import torch

    head_dim, factor = t.query_scale
    cols = _numel(t.shape[1:])
    rows = torch.arange(start, start + chunk.numel(), dtype=torch.int64) // cols
    is_query = (rows % (3 * head_dim)) < head_dim
    return torch.where(is_query, chunk.float() * factor, chunk.float())


def write_safetensors(path: Path, tensors: list[tuple[str, LazyTensor]], dtype) -> int:
    """Write ``tensors`` (floating ones cast to ``dtype``) as one safetensors file, streaming; returns bytes.

    The format (github.com/huggingface/safetensors): u64 little-endian header size, a JSON header of
    ``{name: {dtype, shape, data_offsets}}`` padded to 8 bytes, then the tensors' bytes back to back."""
    import torch

    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, t in tensors:
        dt = _out_dtype(t, dtype)
        nbytes = t.numel * torch.empty((), dtype=dt).element_size()
        header[name] = {"dtype": _ST_DTYPE[str(dt).removeprefix("torch.")], "shape": list(t.shape),
                        "data_offsets": [off, off + nbytes]}
        off += nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for _, t in tensors:
            dt = _out_dtype(t, dtype)
            at = 0  # flat offset of the piece in the tensor
            for piece in t.pieces:
                for a in range(0, piece.numel(), CHUNK_ELEMS):
                    c = piece[a:a + CHUNK_ELEMS]
                    o = c if t.query_scale is None else _scale_query_rows(c, at + a, t)
                    o = o if o.dtype == dt else o.to(dt)
                    f.write(memoryview(o.contiguous().view(torch.uint8).numpy()))
                    del o
                    _drop_pages(c)
                at += piece.numel()
    return off


def expected_tensors(config) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` an HF ``GPTNeoXForCausalLM`` of ``config`` saves (built on the meta device:
    no memory, no init); tied duplicates are left out, as ``save_pretrained`` does."""
    import torch
    from transformers import GPTNeoXForCausalLM

    with torch.device("meta"):
        model = GPTNeoXForCausalLM(config)
    unique = {n for n, _ in model.named_parameters()}
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k in unique or k not in every}


def export_memory_bytes(step_dir: str | os.PathLike) -> int:
    """Host memory the export of ``step_dir`` needs (what :func:`export_on_cluster` reserves): the
    process's base plus a few chunks and the bf16 cast of one, whatever the model size."""
    return EXPORT_BASE_BYTES + 4 * CHUNK_ELEMS * 4


def export_hf(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
              *, dtype: str = "fp32", max_shard_bytes: int = DEFAULT_SHARD_BYTES, link_run: bool = True) -> Path:
    """Write checkpoint ``checkpoint`` (a ``step_XXXXXX`` dir) as an HF model to ``out_dir``; returns it.

    ``dtype``: ``fp32`` (the master weights, exact) or ``bf16``. ``max_shard_bytes``: safetensors shard
    size. ``tokenizer_dir`` defaults to the tokenizer recorded in the checkpoint. With ``link_run`` an
    MLflow ``checkpoint`` run is started, linked to the pretrain run (and its data/tokenizer ancestors),
    and ``out_dir/polyko_run.json`` written so evaluation and serving link back to it.
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig, GPTNeoXConfig

    from polyko.model import ENDOFTEXT_ID, PAD_ID

    if dtype not in DTYPES:
        raise ValueError(f"export dtype must be one of {DTYPES}, got {dtype!r}")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    checkpoint = Path(checkpoint)
    try:
        meta = ckpt_io.validate(checkpoint)
    except ckpt_io.CheckpointError as e:
        raise ValueError(f"cannot export: {e}") from None
    tok_dir = Path(tokenizer_dir or meta["tokenizer"])
    if not (tok_dir / "tokenizer.json").is_file():
        raise ValueError(f"tokenizer dir {tok_dir} has no tokenizer.json; pass --tokenizer")
    config = GPTNeoXConfig.from_dict(meta["model_config"])
    config.use_cache = True
    config.dtype = torch_dtype
    fold = mup_query_factor(meta)
    for key in ("mup_width_mult", "mup_attention_scale"):  # the export is a standard GPT-NeoX
        if hasattr(config, key):
            delattr(config, key)

    tensors = checkpoint_tensors(checkpoint)
    expected = expected_tensors(config)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: {tensors[k].shape} != {expected[k]}" for k in expected if k in tensors
             and tensors[k].shape != expected[k]]
    if missing or extra or wrong:  # every weight accounted for, nothing extra
        raise ValueError(f"checkpoint {checkpoint} does not match its GPT-NeoX config: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}, wrong shapes {wrong[:5]}")

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if fold is not None:  # μP: its attention scale folded into the query rows (exact; HF's 1/sqrt(d) stays)
        head_dim = config.hidden_size // config.num_attention_heads
        for k in expected:
            if "query_key_value" in k:
                tensors[k] = LazyTensor(tensors[k].shape, tensors[k].pieces, query_scale=(head_dim, fold))
    _write_weights(tmp, [(k, tensors[k]) for k in expected], torch_dtype, max_shard_bytes)
    del tensors  # unmaps the checkpoint files
    config.save_pretrained(tmp)
    gen = GenerationConfig.from_model_config(config)
    gen.eos_token_id, gen.pad_token_id = ENDOFTEXT_ID, PAD_ID
    gen.save_pretrained(tmp)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    if "<|endoftext|>" in tok.get_vocab():  # Polyglot-Ko convention: documents end with <|endoftext|> (id 2)
        tok.eos_token = "<|endoftext|>"
    if tok.pad_token is None and "<pad>" in tok.get_vocab():
        tok.pad_token = "<pad>"
    tok.save_pretrained(tmp)
    (tmp / "polyko_export.json").write_text(json.dumps(
        {"checkpoint": str(checkpoint.resolve()), "step": meta["step"], "tokens_seen": meta["tokens_seen"],
         "pretrain_run_id": meta.get("run_id"), "dtype": dtype, "parametrization": parametrization(meta),
         **({"query_scale_folded": fold} if fold is not None else {})}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)  # the export appears complete or not at all
    if link_run:
        _track_export(out, checkpoint, meta, tok_dir)
    return out


def parametrization(meta: dict) -> str:
    """``standard`` or ``mup``: how the checkpoint's model was trained (``config.model.parametrization`` in
    its metadata; checkpoints from before the field are standard)."""
    p = ((meta.get("config") or {}).get("model") or {}).get("parametrization") or "standard"
    if p not in ("standard", "mup"):
        raise ValueError(f"checkpoint has an unknown model.parametrization {p!r} (standard or mup)")
    return p


def mup_query_factor(meta: dict) -> float | None:
    """For a μP checkpoint, the factor its query rows are multiplied by so that HF's standard attention scale
    ``1/sqrt(d_head)`` gives μP's ``s`` (``model_config.mup_attention_scale`` as training set it, else
    :func:`polyko.sweep.mup.attention_scale` of the model's head dim): ``s * sqrt(d_head)``, the factor
    :func:`polyko.sweep.mup.fold_attention_scale` applies. ``None`` for a standard checkpoint."""
    import math

    if parametrization(meta) != "mup":
        return None
    mc = meta["model_config"]
    head_dim = mc["hidden_size"] // mc["num_attention_heads"]
    scale = mc.get("mup_attention_scale")
    if scale is None:
        from polyko.sweep.mup import attention_scale

        scale = attention_scale(head_dim)
    return float(scale) * math.sqrt(head_dim)


def _write_weights(out: Path, tensors: list[tuple[str, LazyTensor]], dtype, max_shard_bytes: int) -> None:
    """``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``
    (``save_pretrained``'s names) when the weights exceed ``max_shard_bytes``."""
    import torch

    shards: list[list[tuple[str, LazyTensor]]] = [[]]
    size = 0
    total = 0
    for name, t in tensors:
        nbytes = t.numel * torch.empty((), dtype=_out_dtype(t, dtype)).element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
        total += nbytes
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", shards[0], dtype)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / fname, shard, dtype)
        weight_map.update({name: fname for name, _ in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")


def _track_export(out: Path, checkpoint: Path, meta: dict, tok_dir: Path) -> None:
    from polyko import tracking

    parents = tracking.lineage(checkpoint.parent.parent.parent, tok_dir)
    if meta.get("run_id"):
        parents["pretrain"] = meta["run_id"]
    info = {"checkpoint": str(checkpoint.resolve()), "step": meta["step"], "tokens_seen": meta["tokens_seen"],
            "size": meta["config"]["model"]["size"]}
    with tracking.start_run("checkpoint", info, output=out, parents=parents,
                            run_name=f"checkpoint-{meta['config']['model']['size']}-step{meta['step']}"):
        import mlflow

        mlflow.log_metrics({"step": meta["step"], "tokens_seen": meta["tokens_seen"], "loss": meta.get("loss", 0.0)})


def _export_task(checkpoint: str, out_dir: str, tokenizer_dir: str | None, dtype: str, max_shard_bytes: int) -> str:
    return str(export_hf(checkpoint, out_dir, tokenizer_dir, dtype=dtype, max_shard_bytes=max_shard_bytes,
                         link_run=False))


def export_on_cluster(checkpoint: str | os.PathLike, out_dir: str | os.PathLike,
                      tokenizer_dir: str | os.PathLike | None = None, *, dtype: str = "fp32",
                      link_run: bool = True, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """:func:`export_hf` where the memory is: called by the driver (which may sit on a small CPU head).

    With Ray initialised the export is a Ray task reserving 1 CPU and :func:`export_memory_bytes` of Ray's
    ``memory`` resource, so it lands on a node that has both (never a ``num-cpus 0`` head); the checkpoint
    and ``out_dir`` must be on storage that node sees (as Ray Train's storage path is). Without Ray it
    runs inline. The MLflow ``checkpoint`` run is recorded from the driver afterwards."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return export_hf(checkpoint, out_dir, tokenizer_dir, dtype=dtype, max_shard_bytes=max_shard_bytes,
                         link_run=link_run)
    need = export_memory_bytes(checkpoint)
    fits = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1
            and n["Resources"].get("memory", 0) >= need]
    if not fits:
        raise ValueError(f"no node of the Ray cluster has 1 CPU and {need / 2**30:.1f} GiB of Ray memory for the "
                         "export; export later with jobs/export.py on a machine that has")
    task = ray.remote(num_cpus=1, memory=need, max_retries=1)(_export_task)
    out = Path(ray.get(task.remote(str(Path(checkpoint).resolve()), str(Path(out_dir).resolve()),
                                   str(tokenizer_dir) if tokenizer_dir else None, dtype, max_shard_bytes)))
    if link_run:
        meta = ckpt_io.validate(checkpoint)
        _track_export(out, Path(checkpoint), meta, Path(tokenizer_dir or meta["tokenizer"]))
    return out
