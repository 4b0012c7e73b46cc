"""polyko's tokenizer: morpheme-aware byte-level BPE with Polyglot-Ko's special-token ids.

    morph      soynlp word scores -> morpheme-like boundaries (U+0CF1 markers) for BPE training
    corpus     streaming Parquet/JSONL/text documents, deterministic held-out split
    bpe        the BPE pipeline, special tokens/ids, the saved directory, ``tokenizer_hash``
    fertility  tokens per character / word and morpheme-boundary agreement on held-out text
    rankbpe    the same BPE run by tiktoken (identical ids, ~5x faster): what packing encodes with
    train      ``TokenizerConfig`` + ``train_tokenizer`` (streaming, MLflow-tracked)

Train on a CPU: ``python jobs/train_tokenizer.py --input DIR/cleaned --output TOKDIR --vocab-size 30000``.
Use: ``transformers.AutoTokenizer.from_pretrained(TOKDIR)`` or ``polyko.tokenizer.load_tokenizer(TOKDIR)``.
"""

from polyko.tokenizer.bpe import (ALL_SPECIAL_TOKENS, ENDOFTEXT, HEAD_SPECIAL_TOKENS, PII_SPECIAL_TOKENS,
                                  load_tokenizer, tokenizer_hash)
from polyko.tokenizer.morph import MARKER, MorphConfig, MorphemeSegmenter
from polyko.tokenizer.train import TokenizerConfig, train_tokenizer

__all__ = ["ALL_SPECIAL_TOKENS", "ENDOFTEXT", "HEAD_SPECIAL_TOKENS", "MARKER", "MorphConfig", "MorphemeSegmenter",
           "PII_SPECIAL_TOKENS", "TokenizerConfig", "load_tokenizer", "tokenizer_hash", "train_tokenizer"]
