"""Export a pretraining checkpoint (any saved step) to a Hugging Face GPT-NeoX directory.

    python jobs/export.py --checkpoint out/pretrain/<hash>/ray/<run>/step_000100 --output out/hf-step100
    python jobs/export.py --checkpoint ... --output ... --tokenizer out/tokenizer   # override the recorded tokenizer

The result loads with AutoModelForCausalLM.from_pretrained and lm-eval's hf model; an MLflow
"checkpoint" run linked to the pretrain run is recorded.
"""

import argparse
import sys

from polyko.train.export import export_hf


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a step_XXXXXX checkpoint directory")
    p.add_argument("--output", required=True, help="HF model directory to write")
    p.add_argument("--tokenizer", help="tokenizer dir (default: the one recorded in the checkpoint)")
    p.add_argument("--no-track", action="store_true", help="do not record an MLflow checkpoint run")
    a = p.parse_args(argv)
    try:
        out = export_hf(a.checkpoint, a.output, a.tokenizer, link_run=not a.no_track)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {a.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
