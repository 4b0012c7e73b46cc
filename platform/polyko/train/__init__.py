"""Ray Train + DeepSpeed pretraining of GPT-NeoX (Polyglot-Ko recipe).

    config      PretrainConfig (nested dataclasses, per-size defaults), batch layout, DeepSpeed JSON, lr schedule
    data        deterministic global-index sampler over packed token shards (resume = skip to step)
    loop        the per-worker train loop
    checkpoint  save / validate / select / reshard (universal checkpoint)
    export      checkpoint -> Hugging Face GPT-NeoX directory
    metrics     per-step metrics to MLflow, Ray gauges and metrics.jsonl
    trainer     pretrain(cfg) -> PretrainResult

CPU quickstart: ``python jobs/pretrain.py --size tiny --data out --tokenizer out/tokenizer --steps 20``.
"""

from polyko.train.config import PretrainConfig
from polyko.train.trainer import PretrainResult, pretrain

__all__ = ["PretrainConfig", "PretrainResult", "pretrain"]
