"""Model registry: HF checkpoints as MLflow model versions with aliases, and back to local dirs.

    register_checkpoint("work/quickstart/pretrain/hf", "polyko-tiny", alias="candidate")   # -> version "1"
    resolve_model("models:/polyko-tiny@candidate")                               # -> local HF dir

How a checkpoint is stored (and why). MLflow 3's ``register_model("runs:/<id>/folder")`` refuses a
plain folder (no ``MLmodel``). Of the two routes, we log the HF directory AS IS as run artifacts
(``<run>/hf_model/``: config.json, safetensors, tokenizer files, polyko_run.json) and create the
version with ``MlflowClient.create_model_version(name, source=<artifact URI of that folder>,
run_id=...)``. The other route, ``mlflow.transformers.log_model``, loads the whole model into RAM
to re-save it in its own layout (25 GB for 12.8B), pins pip requirements, and gives back a
directory that is not a plain HF checkpoint. Ours uploads the files byte for byte (no model load),
and what comes back is loadable by ``AutoModelForCausalLM.from_pretrained``, DeepSpeed, vLLM or
our server alike. What we give up: ``mlflow.pyfunc.load_model`` does not apply (no MLmodel) --
use :func:`resolve_model`.

Which run holds the files: ``run_id`` when given (e.g. the evaluation that qualified the
checkpoint); else the run recorded in the directory's ``polyko_run.json`` (the export/pretrain
run) when it lives on the same tracking server; else a new run in ``polyko-checkpoint``.
Registering the same directory again into the same run reuses the uploaded files.

Resolved models are cached per tracking server and version under ``<work dir>/models`` (or
``$POLYKO_MODEL_CACHE``); a download lands in a temp dir renamed into place when complete, so a
killed download never looks like a model. Aliases are looked up on every call (they move).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from polyko import tracking

ARTIFACT_PATH = "hf_model"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))?/?$")
_RUN_URI = re.compile(r"^runs:/(?P<run_id>[0-9a-zA-Z]+)(?:/(?P<path>.*))?$")


@dataclass
class RegisterConfig:
    """What ``jobs/register.py`` registers (logged as the params of a new checkpoint run)."""

    hf_dir: str
    name: str
    alias: str = ""


def _client():
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking.tracking_uri())


def _is_hf_dir(p: Path) -> bool:
    return (p / "config.json").is_file()


def _listing(files: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(files.items())


def _local_files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def _remote_files(client, run_id: str, path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in client.list_artifacts(run_id, path):
        if f.is_dir:
            out.update(_remote_files(client, run_id, f.path))
        else:
            out[f.path[len(path) + 1:] if f.path.startswith(path + "/") else f.path] = int(f.file_size or 0)
    return out


def _upload(client, run_id: str, hf_dir: Path) -> str:
    """Log ``hf_dir`` under the run (reusing an identical earlier upload); the artifact path."""
    local = _local_files(hf_dir)
    for i in range(100):
        path = ARTIFACT_PATH if i == 0 else f"{ARTIFACT_PATH}_{i}"
        remote = _remote_files(client, run_id, path)
        if not remote:
            client.log_artifacts(run_id, str(hf_dir), artifact_path=path)
            return path
        if _listing(remote) == _listing(local):
            return path  # the same files are already there: don't upload gigabytes again
    raise RuntimeError(f"run {run_id} already holds 100 different checkpoints")


def _same_server(marker: dict) -> bool:
    return marker.get("tracking_uri") == tracking.tracking_uri()


def register_checkpoint(hf_dir: str | os.PathLike, name: str, *, alias: str | None = None,
                        run_id: str | None = None) -> str:
    """Register the HF checkpoint ``hf_dir`` as a new version of model ``name``; returns the version
    (a string, e.g. ``"3"``). ``alias`` (``candidate``, ``production``) is moved to it."""
    from mlflow.exceptions import MlflowException

    src = Path(hf_dir).expanduser().resolve()
    if not _is_hf_dir(src):
        raise ValueError(f"{src} is not an HF checkpoint directory (no config.json)")
    if not any(src.glob("*.safetensors")) and not any(src.glob("*.bin")):
        raise ValueError(f"{src} has no weights (*.safetensors / *.bin)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name):
        raise ValueError(f"model name {name!r}: use letters, digits, '.', '_' and '-'")
    if alias and not re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]*", alias):
        raise ValueError(f"alias {alias!r}: use letters, digits, '_' and '-' (e.g. candidate, production)")
    client = _client()
    marker = tracking.read_marker(src)
    if run_id is None and marker and _same_server(marker):
        try:
            client.get_run(marker["run_id"])
            run_id = marker["run_id"]
        except MlflowException:
            run_id = None  # the marker's run was deleted: fall through to a new run
    if run_id is None:
        cfg = RegisterConfig(hf_dir=str(src), name=name, alias=alias or "")
        with tracking.start_run("checkpoint", cfg, parents=tracking.lineage(src),
                                run_name=f"register-{name}", tags={"polyko.checkpoint": str(src)}) as run:
            run_id = run.info.run_id
            path = _upload(client, run_id, src)
    else:
        path = _upload(client, run_id, src)
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{path}"
    try:
        client.create_registered_model(name, description="polyko HF checkpoints (GPT-NeoX, Polyglot-Ko recipe)")
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code) and "already exists" not in str(e):
            raise
    tags = {"polyko.source_dir": str(src), "polyko.artifact_path": path}
    if marker:
        tags["polyko.source_run"] = marker.get("run_id", "")
        tags["polyko.config_hash"] = str(marker.get("config_hash") or "")
    mv = client.create_model_version(name, source=source, run_id=run_id, tags=tags,
                                     description=f"HF checkpoint from {src}")
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    return str(mv.version)


def set_alias(name: str, alias: str, version: str | int) -> None:
    """Point ``alias`` (e.g. ``production``) at an existing version: promotion/rollback."""
    _client().set_registered_model_alias(name, alias, str(version))


def alias_version(name: str, alias: str) -> str:
    """The version ``models:/name@alias`` points at now (one registry call; for polling)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(_client().get_model_version_by_alias(name, alias).version)
    except MlflowException as e:
        raise ValueError(f"cannot resolve models:/{name}@{alias}: {e.message}") from None


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    root = cache_dir or os.environ.get("POLYKO_MODEL_CACHE") or (tracking.work_dir() / "models")
    # One namespace per tracking server: version numbers are only unique within one.
    server = hashlib.sha1(tracking.tracking_uri().encode()).hexdigest()[:10]
    return Path(root).expanduser().resolve() / server


def _download(artifact_uri: str, dest: Path) -> Path:
    """Download ``artifact_uri`` (a folder) into ``dest`` atomically; ``dest`` if already there."""
    import mlflow

    if _is_hf_dir(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(tmp),
                                                       tracking_uri=tracking.tracking_uri()))
        if not _is_hf_dir(got):
            raise ValueError(f"{artifact_uri} is not an HF checkpoint (no config.json in the artifacts)")
        try:
            got.rename(dest)
        except OSError:
            if not _is_hf_dir(dest):  # not a concurrent download that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_model(model: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local HF checkpoint directory for ``model``: a local dir (returned as is),
    ``models:/name@alias``, ``models:/name/N``, ``models:/name`` (latest version) or
    ``runs:/<run id>/<path>``; registry URIs are downloaded once into the cache."""
    from mlflow.exceptions import MlflowException

    model = str(model)
    p = Path(model).expanduser()
    if not model.startswith(("models:/", "runs:/")):
        if p.is_dir():
            if not _is_hf_dir(p):
                raise ValueError(f"{p.resolve()} is not an HF checkpoint directory (no config.json)")
            return p.resolve()
        raise ValueError(f"model {model!r} is neither a directory nor a models:/ or runs:/ URI")
    client = _client()
    root = _cache_root(cache_dir)
    if m := _MODEL_URI.match(model):
        name, alias, version = m["name"], m["alias"], m["version"]
        try:
            if alias:
                mv = client.get_model_version_by_alias(name, alias)
            elif version and version != "latest":
                mv = client.get_model_version(name, version)
            else:
                versions = client.search_model_versions(f"name='{name}'")
                if not versions:
                    raise ValueError(f"registered model {name!r} has no versions")
                mv = max(versions, key=lambda v: int(v.version))
        except MlflowException as e:
            raise ValueError(f"cannot resolve {model}: {e.message}") from None
        return _download(mv.source, root / name / f"v{mv.version}")
    if m := _RUN_URI.match(model):
        run_id, path = m["run_id"], (m["path"] or ARTIFACT_PATH).strip("/")
        try:
            run = client.get_run(run_id)
        except MlflowException as e:
            raise ValueError(f"cannot resolve {model}: {e.message}") from None
        safe = re.sub(r"[^0-9A-Za-z_.\-]", "_", path)
        return _download(f"{run.info.artifact_uri.rstrip('/')}/{path}", root / "runs" / run_id / safe)
    raise ValueError(f"malformed model URI {model!r}; use models:/name@alias, models:/name/N or runs:/<id>/<path>")
