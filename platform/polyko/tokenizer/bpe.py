"""The byte-level BPE model of polyko's tokenizer, its special tokens, and the saved directory.

Ids follow the released Polyglot-Ko tokenizer exactly, so checkpoints, eval and serving code can
hard-code nothing and still agree with EleutherAI/polyglot-ko-*:

    0 <pad>   1 <eos>   2 <|endoftext|> (the eos the model is trained with)   3 <|sep|>
    4 .. V-1  learned BPE tokens (the 256 byte symbols first, then merges)    V = vocab_size
    V <|acc|>   V+1 <|tel|>   V+2 <|rrn|>   V+3 <|email|>     (PII placeholders, never split)

Pipeline (as in Polyglot-Ko's tokenizer.json): no normalizer (text is encoded byte for byte, so
every string round-trips), pre-tokenizer ``Sequence[Split(U+0CF1, Removed), ByteLevel(use_regex)]``,
ByteLevel decoder. The saved directory loads with ``transformers.AutoTokenizer.from_pretrained``
offline (eos ``<|endoftext|>``, pad ``<pad>``) and with ``tokenizers.Tokenizer.from_file``.

The one string that does not round-trip is U+0CF1 itself (the morpheme marker, a Kannada sign),
which the pre-tokenizer removes, exactly as in Polyglot-Ko.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from polyko.config import config_hash
from polyko.tokenizer.morph import MARKER

# Before the BPE vocabulary (ids 0..3), in this order.
HEAD_SPECIAL_TOKENS = ("<pad>", "<eos>", "<|endoftext|>", "<|sep|>")
PAD, EOS, ENDOFTEXT, SEP = HEAD_SPECIAL_TOKENS
# After the BPE vocabulary (ids V..V+3). Must equal polyko.data.clean.PII_TOKENS' values: the
# cleaner writes them into the text, the tokenizer keeps each one a single id.
PII_SPECIAL_TOKENS = ("<|acc|>", "<|tel|>", "<|rrn|>", "<|email|>")
ALL_SPECIAL_TOKENS = HEAD_SPECIAL_TOKENS + PII_SPECIAL_TOKENS
MIN_VOCAB = len(HEAD_SPECIAL_TOKENS) + 256 + 1   # specials + every byte + at least one merge


def new_tokenizer():
    """An untrained BPE with Polyglot-Ko's pipeline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(MARKER, behavior="removed"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def new_trainer(vocab_size: int, min_frequency: int):
    from tokenizers import pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} is too small: needs >= {MIN_VOCAB} "
                         f"({len(HEAD_SPECIAL_TOKENS)} special tokens + 256 bytes + merges)")
    # vocab_size counts the 4 head specials and the 256-symbol byte alphabet, as Polyglot-Ko's
    # 30,000 does (4 + 256 + 29,740 merges).
    return trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                               special_tokens=list(HEAD_SPECIAL_TOKENS),
                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet())


def add_pii_tokens(tok) -> None:
    """Append the PII placeholders right after the learned vocabulary (special: never split)."""
    n = tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens(list(PII_SPECIAL_TOKENS))
    for k, t in enumerate(PII_SPECIAL_TOKENS):
        assert tok.token_to_id(t) == n + k, (t, tok.token_to_id(t), n + k)
    for k, t in enumerate(HEAD_SPECIAL_TOKENS):
        assert tok.token_to_id(t) == k, (t, tok.token_to_id(t))


def save_tokenizer_dir(tok, out_dir: str | os.PathLike, *, model_max_length: int) -> Path:
    """Write ``tokenizer.json`` + the transformers files. ``tokenizer_class`` is the generic
    ``PreTrainedTokenizerFast`` (what Polyglot-Ko ships): transformers 4 and 5 both load it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    additional = [EOS, SEP, *PII_SPECIAL_TOKENS]
    special = {"eos_token": ENDOFTEXT, "pad_token": PAD, "additional_special_tokens": additional}
    # transformers 5 reads ``additional_special_tokens`` too (and re-saves it as
    # ``extra_special_tokens``, a list that transformers 4 would reject): keep the portable name.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
              "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
              "add_bos_token": False, "add_eos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
    return out


def load_tokenizer(tokenizer_dir: str | os.PathLike):
    """The Rust ``tokenizers.Tokenizer`` of a tokenizer directory (or a tokenizer.json path)."""
    from tokenizers import Tokenizer

    p = Path(tokenizer_dir)
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise ValueError(f"no tokenizer.json at {tokenizer_dir}")
    return Tokenizer.from_file(str(f))


def tokenizer_hash(tokenizer_dir: str | os.PathLike, length: int = 16) -> str:
    """Content hash of ``tokenizer.json`` (canonical JSON; truncation/padding settings ignored):
    two directories with the same vocabulary, merges, pipeline and special ids hash the same,
    whatever the JSON formatting. Token manifests record it."""
    p = Path(tokenizer_dir)
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise ValueError(f"no tokenizer.json at {tokenizer_dir}")
    d = json.loads(f.read_text(encoding="utf-8"))
    d.pop("truncation", None)
    d.pop("padding", None)
    return config_hash(d, length)  # canonical-JSON sha256: formatting-independent
