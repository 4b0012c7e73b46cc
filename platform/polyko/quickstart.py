"""The whole product on a laptop, end to end: clean the bundled dirty Korean sample corpus, train a
morpheme-aware tokenizer on it, pack token shards, pretrain the ``tiny`` GPT-NeoX with Ray Train +
DeepSpeed, export it to HF format, and say where everything is in MLflow.

    python jobs/quickstart.py                # ~2-4 minutes on 2 CPU cores
    python jobs/quickstart.py --steps 300    # longer training

Every stage is one library call with its own config (the same ones the individual jobs build), and
every stage's output is named by its config hash, so re-running the quickstart skips what is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from polyko import tracking


@dataclass
class QuickstartConfig:
    work_dir: str = "work/quickstart"  # everything goes under here (the MLflow store too, unless MLFLOW_TRACKING_URI is set)
    inputs: tuple[str, ...] = ()       # corpus files/dirs; empty = the sample corpus bundled in the package
    vocab_size: int = 8_000            # the sample corpus is ~1 MB: 30,000 merges would mostly be noise
    seq_len: int = 256                 # the tiny preset's context is 512
    size: str = "tiny"
    steps: int = 100                   # optimizer steps of 8 x 256 tokens: loss falls from ~10.3 to ~4.4 (~3 min in all on 2 cores)
    global_batch_tokens: int = 2_048
    num_workers: int = 2               # Ray Train workers (CPU processes, gloo)
    ray_address: str | None = None     # join a cluster instead of starting a private one


@dataclass
class QuickstartResult:
    data_dir: Path
    tokenizer_dir: Path
    export_dir: Path | None
    stats: dict = field(default_factory=dict)
    final_loss: float | None = None
    pretrain_run_id: str | None = None


def run(cfg: QuickstartConfig) -> QuickstartResult:
    from polyko.cluster import init_ray
    from polyko.data.pipeline import PipelineConfig, run_pipeline
    from polyko.tokenizer import TokenizerConfig, train_tokenizer
    from polyko.train import pretrain
    from polyko.train.config import PretrainConfig

    root = Path(cfg.work_dir).resolve()
    init_ray(cfg.ray_address)

    print("== 1/4 clean, mask PII, deduplicate (Ray Data)", flush=True)
    data = PipelineConfig(output=str(root / "data"), inputs=tuple(cfg.inputs), seq_len=cfg.seq_len,
                          ray_address=cfg.ray_address)
    stats = run_pipeline(data)

    print("== 2/4 train the morpheme-aware BPE tokenizer (soynlp + HF tokenizers)", flush=True)
    tok_dir = root / "tokenizer"
    train_tokenizer(TokenizerConfig(input=str(root / "data" / "cleaned"), output=str(tok_dir),
                                    vocab_size=cfg.vocab_size, model_max_length=cfg.seq_len))

    print("== 3/4 tokenize and pack token shards (cleaning is reused: same config hash)", flush=True)
    stats = run_pipeline(replace(data, tokenizer=str(tok_dir)))

    print(f"== 4/4 pretrain '{cfg.size}' with Ray Train + DeepSpeed ({cfg.num_workers} workers)", flush=True)
    train = PretrainConfig()
    train.model.size = cfg.size
    train.data.path, train.data.tokenizer = str(root / "data" / "tokens"), str(tok_dir)
    train.steps = cfg.steps
    train.batch.global_batch_tokens = cfg.global_batch_tokens
    train.scaling.num_workers = cfg.num_workers
    train.checkpoint.every_steps = max(1, cfg.steps // 2)
    train.output = str(root / "pretrain")
    result = pretrain(train, ray_address=cfg.ray_address)

    print("\n== done")
    print(f"cleaned corpus : {root / 'data' / 'cleaned'}  (stats: {root / 'data' / 'stats.json'})")
    print(f"tokenizer      : {tok_dir}  (fertility: {tok_dir / 'report.json'})")
    print(f"token shards   : {root / 'data' / 'tokens'}")
    print(f"HF checkpoint  : {result.export_dir}  (final loss {result.final_loss})")
    print(f"MLflow         : {tracking.tracking_uri()}  -> {tracking.ui_command()}")
    print(f"next           : python jobs/evaluate.py --model {result.export_dir} --shots 0 --limit 20 "
          "[--kobest-dir DIR when offline]")
    print(f"                 python jobs/serve.py --model {cfg.size}={result.export_dir}")
    return QuickstartResult(data_dir=root / "data", tokenizer_dir=tok_dir, export_dir=result.export_dir,
                            stats=stats, final_loss=result.final_loss, pretrain_run_id=result.run_id)
