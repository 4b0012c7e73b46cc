"""polyko: train, track, evaluate and serve Korean GPT-NeoX models (the Polyglot-Ko recipe) on Ray.

Modules, one concept each:
    config     dataclass helpers: to_dict / from_dict / flatten / config_hash / --set overrides
    tracking   MLflow conventions shared by every job (experiments, run names, tags, lineage)
    cluster    start or join a Ray cluster without ever attaching to a stranger's
    model      GPT-NeoX size presets with the exact Polyglot-Ko shapes
    data       the Ray Data corpus pipeline (clean, PII, dedup) and packed token shards
    tokenizer  morpheme-aware byte-level BPE (soynlp + HF tokenizers)
    train      Ray Train + DeepSpeed pretraining
    eval       KoBEST with lm-eval, the paper's table
    serve      Ray Serve OpenAI-style completions
"""

__version__ = "0.1.0"
