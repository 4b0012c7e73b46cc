"""Register an HF checkpoint in the MLflow model registry, or move an alias.

    python jobs/register.py --model work/quickstart/pretrain/hf --name polyko-tiny --alias candidate
    python jobs/register.py --name polyko-tiny --alias production --version 3     # promote / roll back

Load it back anywhere: ``polyko.registry.resolve_model("models:/polyko-tiny@production")`` (also
accepted by jobs/evaluate.py --model and jobs/serve.py --model).
"""

import argparse
import sys

from polyko import registry, tracking


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="HF checkpoint directory to register")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--alias", default="", help="alias to point at the version (candidate, production)")
    p.add_argument("--version", default="", help="with --alias and no --model: point the alias at this existing version")
    p.add_argument("--run-id", default=None, help="log the files under this run (default: the dir's own run, else a new one)")
    a = p.parse_args(argv)
    try:
        if a.model:
            version = registry.register_checkpoint(a.model, a.name, alias=a.alias or None, run_id=a.run_id)
        elif a.alias and a.version:
            registry.set_alias(a.name, a.alias, a.version)
            version = a.version
        else:
            raise ValueError("give --model DIR to register, or --alias A --version N to move an alias")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    uri = f"models:/{a.name}@{a.alias}" if a.alias else f"models:/{a.name}/{version}"
    print(f"{a.name} version {version}: {uri}  (tracking {tracking.tracking_uri()}; UI: {tracking.ui_command()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
