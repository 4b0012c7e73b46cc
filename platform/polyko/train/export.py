"""Export a pretraining checkpoint to a Hugging Face GPT-NeoX directory.

``export_hf(step_dir, out_dir)`` consolidates the DeepSpeed state (ZeRO 1-3 shards through
``deepspeed.utils.zero_to_fp32``; ZeRO-0 from the model-states file) into fp32 weights, loads them
into ``GPTNeoXForCausalLM`` (strictly: every parameter must be present) and writes
``model.safetensors`` + ``config.json`` + ``generation_config.json`` + the tokenizer, so
``AutoModelForCausalLM.from_pretrained(out_dir)`` and lm-eval's ``hf`` model load it.

Run on a CPU (any saved step): ``python jobs/export.py --checkpoint RUN/step_000100 --output OUT``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from polyko.train import checkpoint as ckpt_io

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def consolidated_state_dict(step_dir: str | os.PathLike) -> dict:
    """fp32 ``{name: tensor}`` of a checkpoint's model, whatever its ZeRO stage and worker count."""
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


def export_hf(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
              *, link_run: bool = True) -> Path:
    """Write checkpoint ``checkpoint`` (a ``step_XXXXXX`` dir) as an HF model to ``out_dir``; returns it.

    ``tokenizer_dir`` defaults to the tokenizer recorded in the checkpoint. With ``link_run`` an MLflow
    ``checkpoint`` run is started, linked to the pretrain run (and its data/tokenizer ancestors), and
    ``out_dir/polyko_run.json`` written so evaluation and serving link back to it.
    """
    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    from polyko.model import ENDOFTEXT_ID, PAD_ID

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
    sd = consolidated_state_dict(checkpoint)
    model = GPTNeoXForCausalLM(config)
    try:
        model.load_state_dict(sd, strict=True)  # every weight accounted for, nothing extra
    except RuntimeError as e:
        raise ValueError(f"checkpoint {checkpoint} does not match its GPT-NeoX config: {e}") from None
    model = model.to(torch.float32).eval()
    model.generation_config.eos_token_id = ENDOFTEXT_ID
    model.generation_config.pad_token_id = PAD_ID

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    if "<|endoftext|>" in tok.get_vocab():  # Polyglot-Ko convention: documents end with <|endoftext|> (id 2)
        tok.eos_token = "<|endoftext|>"
    if tok.pad_token is None and "<pad>" in tok.get_vocab():
        tok.pad_token = "<pad>"
    tok.save_pretrained(tmp)
    (tmp / "polyko_export.json").write_text(__import__("json").dumps(
        {"checkpoint": str(checkpoint.resolve()), "step": meta["step"], "tokens_seen": meta["tokens_seen"],
         "pretrain_run_id": meta.get("run_id")}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)  # the export appears complete or not at all
    if link_run:
        _track_export(out, checkpoint, meta, tok_dir)
    return out


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
