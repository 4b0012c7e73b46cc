"""Serve checkpoints behind an OpenAI-style completions API (Ray Serve).

    python jobs/serve.py --model tiny=work/quickstart/pretrain/hf                       # http://127.0.0.1:8000
    python jobs/serve.py --model ko-small=ckpt/a --model models:/polyko-1.3b@prod --max-resident 2
    POLYKO_API_KEY=secret python jobs/serve.py --model ckpt/a --api-key-env POLYKO_API_KEY

    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"model": "tiny", "prompt": "안녕하세요", "max_tokens": 16, "temperature": 0}'

MODEL is an HF checkpoint directory (safetensors only), an MLflow model URI (models:/name@alias,
models:/name/N, runs:/...) or NAME=SOURCE to choose the served name. A models:/name@alias model
follows its alias: after `jobs/register.py --name polyko-1.3b --alias production --version 4` the
service switches to version 4 within --follow-interval seconds without failing a request
(GET /v1/models shows the version answering). Binds 127.0.0.1 unless --host says otherwise.
Further settings: --set limits.max_tokens_limit=256 --set engine.max_batch_size=16 ...
Schema: http://127.0.0.1:8000/docs and /openapi.json.
"""

import argparse
import logging

from polyko.config import apply_overrides
from polyko.serve.app import run_service
from polyko.serve.config import ModelSpec, ServeConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="checkpoint dir, models:/ URI or NAME=SOURCE")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", default="", help="env var holding the bearer API key (none: no auth)")
    p.add_argument("--max-resident", type=int, default=2, help="models resident per replica (LRU beyond)")
    p.add_argument("--follow-interval", type=float, default=30.0,
                   help="seconds between registry polls of models:/name@alias models (0: resolve once)")
    p.add_argument("--ray-address", default=None, help="join this cluster (default: a private local one)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any ServeConfig field")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    cfg = ServeConfig(models=[ModelSpec.parse(m) for m in a.model], host=a.host, port=a.port,
                      api_key_env=a.api_key_env, max_resident=a.max_resident, follow_interval_s=a.follow_interval)
    cfg = apply_overrides(cfg, a.set)
    run_service(cfg, ray_address=a.ray_address, blocking=True)   # until Ctrl-C


if __name__ == "__main__":
    main()
