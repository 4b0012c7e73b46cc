"""Export a pretraining checkpoint (any saved step) to a Hugging Face GPT-NeoX directory.

    python jobs/export.py --checkpoint out/pretrain/<hash>/ray/<run>/step_000100 --output out/hf-step100
    python jobs/export.py --checkpoint ... --output ... --tokenizer out/tokenizer   # override the recorded tokenizer
    python jobs/export.py --checkpoint ... --output ... --dtype bf16 --max-shard-size 2GB
    python jobs/export.py --checkpoint ... --output ... --ray-address auto  # as a task on a node with the memory

Weights are streamed tensor by tensor into sharded safetensors (memory: a few hundred MB whatever the
model size). The result loads with AutoModelForCausalLM.from_pretrained and lm-eval's hf model; an MLflow
"checkpoint" run linked to the pretrain run is recorded.
"""

import argparse
import re
import sys

from polyko.train.export import DEFAULT_SHARD_BYTES, DTYPES, export_on_cluster

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units as save_pretrained; KiB/MiB/GiB binary)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a step_XXXXXX checkpoint directory")
    p.add_argument("--output", required=True, help="HF model directory to write")
    p.add_argument("--tokenizer", help="tokenizer dir (default: the one recorded in the checkpoint)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights dtype (fp32: the exact master weights)")
    p.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_SHARD_BYTES,
                   help="largest safetensors file (default 5GB)")
    p.add_argument("--ray-address", help="run the export as a Ray task on this cluster (default: in this process)")
    p.add_argument("--no-track", action="store_true", help="do not record an MLflow checkpoint run")
    a = p.parse_args(argv)
    if a.ray_address:
        from polyko.cluster import init_ray

        init_ray(a.ray_address)
    try:
        out = export_on_cluster(a.checkpoint, a.output, a.tokenizer, dtype=a.dtype, link_run=not a.no_track,
                                max_shard_bytes=a.max_shard_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {a.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
