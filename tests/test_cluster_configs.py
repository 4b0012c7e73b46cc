"""cluster/ and dashboards/: the deployment files are validated, not just parsed.

* the Ray cluster-launcher config against Ray's own schema (``ray/autoscaler/ray-schema.json``) and
  Ray's own config preparation (``prepare_config`` + ``validate_config``, what ``ray up`` runs);
* the KubeRay manifests against the field names of the KubeRay ``ray.io/v1`` API types
  (``ray-operator/apis/ray/v1/raycluster_types.go`` / ``rayjob_types.go``), and against each other
  (cluster name, PVC, ports), and the RayJob's ``--set`` overrides against the real ``PretrainConfig``;
* every repository path a command mentions exists;
* the dashboards use only the project's fixed metric names, and a real local Ray cluster exports
  exactly those names (scraped from its Prometheus endpoint).
"""

from __future__ import annotations

import copy
import glob
import json
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
DASHBOARDS = REPO / "dashboards"

# The project's fixed Prometheus metric names (ray.util.metrics names; Ray exports them with "ray_").
TRAIN_GAUGES = ["polyko_train_loss", "polyko_train_lr", "polyko_train_grad_norm", "polyko_train_tokens_per_second",
                "polyko_train_tflops", "polyko_train_mfu", "polyko_train_step_seconds",
                "polyko_train_checkpoint_seconds", "polyko_train_step", "polyko_train_guard_anomalies",
                "polyko_train_guard_skipped_steps", "polyko_train_guard_rollbacks", "polyko_train_val_loss",
                "polyko_train_val_bpb"]
SERVE_COUNTERS = ["polyko_serve_requests_total", "polyko_serve_generated_tokens_total",
                  "polyko_serve_model_switches_total"]
SERVE_HISTOGRAMS = ["polyko_serve_request_latency_seconds"]
SERVE_GAUGES = ["polyko_serve_resident_models", "polyko_serve_model_version"]
FIXED = TRAIN_GAUGES + SERVE_COUNTERS + SERVE_HISTOGRAMS + SERVE_GAUGES
EXPORTED = {"ray_" + n for n in TRAIN_GAUGES + SERVE_COUNTERS + SERVE_GAUGES} | {
    f"ray_{n}_{suffix}" for n in SERVE_HISTOGRAMS for suffix in ("bucket", "sum", "count")}

# Field names of the KubeRay ray.io/v1 API (json tags in ray-operator/apis/ray/v1/*_types.go).
RAYCLUSTER_SPEC = {"suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
                   "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs"}
HEAD_GROUP = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
AUTOSCALER_OPTIONS = {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
                      "upscalingMode", "env", "envFrom", "volumeMounts"}
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy", "entrypoint", "runtimeEnvYAML",
               "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
               "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend"}


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _launcher_config() -> dict:
    return yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())


def _raycluster() -> tuple[dict, dict]:
    docs = {d["kind"]: d for d in _yaml_docs(CLUSTER / "kuberay" / "raycluster.yaml")}
    assert set(docs) == {"PersistentVolumeClaim", "RayCluster"}
    return docs["RayCluster"], docs["PersistentVolumeClaim"]


def _rayjob() -> dict:
    (job,) = _yaml_docs(CLUSTER / "kuberay" / "rayjob-pretrain.yaml")
    return job


# ------------------------------------------------------------------------------- Ray cluster launcher


def test_launcher_config_passes_rays_own_schema_and_preparation():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _launcher_config()
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)  # the file as written
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` does: defaults merged, then checked

    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and cfg["provider"]["type"] == "aws"
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    instance_types = {t["node_config"]["InstanceType"] for t in gpu_types.values()}
    assert {"p4d.24xlarge", "p5.48xlarge"} <= instance_types
    for name, t in gpu_types.items():
        assert t["resources"]["GPU"] == 8, name
        # Elastic: scale from zero up to a bound, never more than the cluster-wide cap.
        assert 0 == t["min_workers"] < t["max_workers"] <= cfg["max_workers"], name
    assert types[cfg["head_node_type"]]["resources"].get("CPU") == 0  # no training work on the head
    assert any(v == "." for v in cfg["file_mounts"].values())  # the repository goes to every node
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert starts.count("--metrics-export-port=8080") == 2


def test_rays_schema_rejects_a_misspelt_launcher_config():
    """The schema check above is not vacuous: Ray's schema refuses unknown or mistyped keys."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    bad = _launcher_config()
    bad["available_node_types"]["gpu.h100"]["min_worker"] = 1  # typo of min_workers
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(bad)
    bad = _launcher_config()
    bad["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)


def test_launcher_installs_with_the_repository_installer():
    cfg = _launcher_config()
    setup = " ".join(cfg["setup_commands"])
    assert re.search(r"bash \S*cluster/install\.sh --gpu --venv \S+", setup)


# ---------------------------------------------------------------------------------------- KubeRay


def test_raycluster_manifest_uses_kuberay_v1_fields_and_is_consistent():
    rc, pvc = _raycluster()
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"] == "polyko"
    spec = rc["spec"]
    assert set(spec) <= RAYCLUSTER_SPEC, set(spec) - RAYCLUSTER_SPEC
    assert spec["enableInTreeAutoscaling"] is True
    assert set(spec["autoscalerOptions"]) <= AUTOSCALER_OPTIONS
    assert spec["autoscalerOptions"]["upscalingMode"] in ("Default", "Aggressive", "Conservative")
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP and {"template", "rayStartParams"} <= set(head)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # map[string]string
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    gpu_groups = 0
    pods = [("head", head["template"]["spec"])]
    for g in groups:
        assert set(g) <= WORKER_GROUP, set(g) - WORKER_GROUP
        assert {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(g)
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]
        assert g["maxReplicas"] > g["minReplicas"]  # room to autoscale
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        (container,) = g["template"]["spec"]["containers"]
        res = container["resources"]
        if "nvidia.com/gpu" in res["limits"]:
            gpu_groups += 1
            assert res["limits"] == res["requests"]  # whole, guaranteed GPU nodes
            assert int(res["limits"]["nvidia.com/gpu"]) == 8
        pods.append((g["groupName"], g["template"]["spec"]))
    assert gpu_groups >= 1
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod mounts it
    images = set()
    for name, pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v}
        assert claims == {pvc["metadata"]["name"]}, name
        for c in pod["containers"]:
            images.add(c["image"])
            mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
            assert set(mounts) <= set(volumes), name
            assert "/mnt/polyko" in mounts.values() and "/dev/shm" in mounts.values(), name
            assert {"name": "metrics", "containerPort": 8080} in c["ports"], name
    assert len(images) == 1  # one image (cluster/Dockerfile) everywhere
    assert head["rayStartParams"]["metrics-export-port"] == "8080"


def test_rayjob_runs_pretrain_on_the_raycluster_with_real_flags():
    from polyko.plan import make_plan

    job = _rayjob()
    rc, _ = _raycluster()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC
    assert spec["clusterSelector"] == {"ray.io/cluster": rc["metadata"]["name"]}
    assert not spec.get("shutdownAfterJobFinishes")  # not allowed with clusterSelector
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "jobs/pretrain.py", "--size", "12.8b"] and "--gpu" in argv
    lo, hi = (int(argv[argv.index(flag) + 1]) for flag in ("--min-workers", "--max-workers"))
    # The elastic range fits the cluster: one worker per GPU, at most maxReplicas x 8 GPUs.
    gpu_capacity = max(g["maxReplicas"] * 8 for g in rc["spec"]["workerGroupSpecs"]
                       if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"])
    assert 0 < lo <= hi <= gpu_capacity
    # Works as typed: the inputs come from POLYKO_DATA and the token manifest; the GPU kind is one a GPU group
    # declares (pods autoscale from zero, so the job names it), and the plan fits at the SMALLEST count.
    from polyko.train.trainer import RAY_ACCELERATOR, plan_gpu

    assert "--data" not in argv and "--tokenizer" not in argv
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["POLYKO_DATA"].startswith("/mnt/polyko/")
    gpu = plan_gpu(argv[argv.index("--gpu") + 1])
    declared = {k for g in rc["spec"]["workerGroupSpecs"] if "resources" in g["rayStartParams"]
                for k in json.loads(json.loads(g["rayStartParams"]["resources"]))}
    assert f"accelerator_type:{RAY_ACCELERATOR[gpu]}" in declared
    assert make_plan("12.8b", gpus=lo, gpu=gpu, stages=(1, 2, 3)).fits
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    # --steps is the paper's token budget at the paper's batch, as the planner computes it.
    steps = int(argv[argv.index("--steps") + 1])
    assert steps == make_plan("12.8b", gpus=hi, gpu="a100-80gb").steps
    # The real job script accepts every flag and --set key (argparse / apply_overrides would exit
    # non-zero), resolves the config and finds that the job fits the GPUs it asks for.
    proc = subprocess.run([sys.executable, *argv[1:], "--plan", "--gpus", str(hi), "--gpu", "a100-80gb"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"12.8b on {hi} x a100-80gb" in proc.stdout
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == _dockerfile_workdir()
    for v in runtime_env.get("env_vars", {}).values():
        assert isinstance(v, str)  # Ray requires string env vars


# --------------------------------------------------------------------------- Docker, Prometheus


def _dockerfile_workdir() -> str:
    return re.findall(r"^WORKDIR\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), re.M)[-1]


def test_dockerfile_builds_through_the_installer():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\S+-devel-\S+", text, re.M)  # nvcc for DeepSpeed JIT ops
    assert re.search(r"^RUN bash cluster/install\.sh --gpu --venv (\S+)", text, re.M)
    venv = re.search(r"cluster/install\.sh --gpu --venv (\S+)", text).group(1)
    assert f"PATH={venv}/bin:" in text  # ray/python of the image are the venv's (KubeRay runs `ray start`)
    assert "wget" in text  # KubeRay's health probes
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


def test_prometheus_scrapes_rays_service_discovery_file():
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    prom = yaml.safe_load((CLUSTER / "prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert job["job_name"] == "ray"  # same job label as Ray's generated config and dashboards
    (sd,) = job["file_sd_configs"]
    assert sd["files"] == [f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
    assert prom["global"]["scrape_interval"].endswith("s")

    (pm,) = _yaml_docs(CLUSTER / "kuberay" / "podmonitor.yaml")
    rc, _ = _raycluster()
    assert pm["kind"] == "PodMonitor" and pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["spec"]["selector"]["matchLabels"] == {"ray.io/cluster": rc["metadata"]["name"]}
    ports = {p["name"] for g in rc["spec"]["workerGroupSpecs"] for p in g["template"]["spec"]["containers"][0]["ports"]}
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= ports


# ------------------------------------------------------------------ commands refer to real files

PATH_RE = re.compile(r"(?<![\w.-])(?:/home/ubuntu/polyko/|/app/)?((?:cluster|jobs|dashboards|benchmarks|platform)/[\w./*-]+)")


def _mentioned_paths() -> dict[str, str]:
    """repo-relative path (maybe a glob) -> the file that mentions it, from commands only."""
    found: dict[str, str] = {}
    cfg = _launcher_config()
    commands = [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                              "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
                for c in cfg.get(key, [])]
    for c in commands:
        for p in PATH_RE.findall(c):
            found[p] = "cluster/ray-cluster.yaml"
    for p in PATH_RE.findall(_rayjob()["spec"]["entrypoint"]):
        found[p] = "cluster/kuberay/rayjob-pretrain.yaml"
    for line in (CLUSTER / "Dockerfile").read_text().splitlines():
        if line.startswith(("RUN", "COPY", "CMD")) or line.startswith("    "):
            for p in PATH_RE.findall(line):
                found[p] = "cluster/Dockerfile"
    return found


def test_commands_refer_to_files_in_the_repository():
    found = _mentioned_paths()
    # The configs do run the installer, the pretraining job and ship the dashboards.
    assert {"cluster/install.sh", "jobs/pretrain.py", "dashboards/polyko-*.json"} <= set(found)
    missing = {p: src for p, src in found.items() if not glob.glob(str(REPO / p))}
    assert not missing, f"paths in commands that are not in the repository: {missing}"


# ------------------------------------------------------------------------------------ dashboards

METRIC_RE = re.compile(r"\bray_[A-Za-z0-9_:]+")


def _dashboards() -> dict[str, dict]:
    files = sorted(DASHBOARDS.glob("*.json"))
    assert {f.name for f in files} >= {"polyko-training.json", "polyko-serving.json"}
    return {f.name: json.loads(f.read_text()) for f in files}


def _queries(dash: dict) -> list[str]:
    out = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            out.append(q["query"] if isinstance(q, dict) else q)
    return out


def test_dashboards_are_valid_grafana_json_using_only_the_fixed_metric_names():
    used: set[str] = set()
    for name, dash in _dashboards().items():
        assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30, name
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), name
        variables = {v["name"] for v in dash["templating"]["list"]}
        assert "datasource" in variables, name
        for p in dash["panels"]:
            assert p["type"] in ("timeseries", "stat") and p["targets"], (name, p["title"])
            assert p["datasource"]["uid"] == "${datasource}", (name, p["title"])
            assert {"x", "y", "w", "h"} <= set(p["gridPos"]), (name, p["title"])
        for q in _queries(dash):
            names = set(METRIC_RE.findall(q))
            assert names, (name, q)
            unknown = names - EXPORTED
            assert not unknown, f"{name}: metric names outside the project's list: {unknown} in {q}"
            used |= names
            for ref in re.findall(r"\$(\w+)", q):  # every $variable is defined (or a Grafana built-in)
                assert ref in variables or ref.startswith("__"), (name, ref)
            assert q.count("(") == q.count(")") and q.count("{") == q.count("}"), (name, q)
    # ... and together they show every one of the fixed metrics.
    covered = {re.sub(r"_(bucket|sum|count)$", "", n) if n.startswith("ray_polyko_serve_request_latency") else n
               for n in used}
    assert covered == {"ray_" + n for n in FIXED}


def test_the_fixed_metric_names_are_what_the_code_creates():
    """The lists above are the names the trainer and the serving app register, no more, no fewer."""
    from polyko.train import metrics as train_metrics

    assert {"polyko_train_" + k.replace("/", "_") for k in train_metrics.GAUGES} == set(TRAIN_GAUGES)
    src = (REPO / "platform" / "polyko" / "serve" / "metrics.py").read_text()
    created = dict((name, kind) for kind, name in re.findall(r"metrics\.(Counter|Histogram|Gauge)\(\s*\"(\w+)\"", src))
    assert created == {**{n: "Counter" for n in SERVE_COUNTERS}, **{n: "Histogram" for n in SERVE_HISTOGRAMS},
                       **{n: "Gauge" for n in SERVE_GAUGES}}


def test_dashboards_query_exactly_what_ray_exports(ray_local):
    """Record every fixed metric through ray.util.metrics in a Ray task of a real local cluster, scrape the
    node's Prometheus endpoint, and find each dashboard metric name with the labels the panels use."""
    ray = ray_local
    from ray._private.worker import global_worker

    port = global_worker.node.metrics_export_port

    @ray.remote(num_cpus=0)
    def record() -> None:
        from ray.util import metrics

        tags = {"run": "cfg-test", "size": "tiny"}
        for i, name in enumerate(TRAIN_GAUGES):
            metrics.Gauge(name, description="test", tag_keys=("run", "size")).set(float(i + 1), tags=tags)
        # The serving metrics through the serving app's own objects (the names and tags it really uses).
        from polyko.serve.metrics import registry_metrics, resident_models_gauge, serve_metrics

        serve_metrics().record("m", 200, 0.5, generated_tokens=7)
        resident_models_gauge().set(1, tags={"replica": "r0"})
        switches, version = registry_metrics()
        switches.inc(1, tags={"model": "m"})
        version.set(3, tags={"model": "m", "replica": "r0"})
        time.sleep(12)  # stay alive past a metrics report interval (10 s) so the agent has the values

    ref = record.remote()
    deadline = time.monotonic() + 90
    series: dict[str, list[str]] = {}
    while time.monotonic() < deadline:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        series = {}
        for line in body.splitlines():
            if line.startswith("ray_polyko_"):
                series.setdefault(re.split(r"[{ ]", line, maxsplit=1)[0], []).append(line)
        if EXPORTED <= set(series):
            break
        time.sleep(2)
    ray.get(ref)
    used = set().union(*(METRIC_RE.findall(q) for d in _dashboards().values() for q in _queries(d)))
    assert used <= set(series), f"dashboard metrics Ray did not export: {used - set(series)}"
    # The labels the panels group and filter by are on the exported series.
    labels = {"ray_polyko_train_loss": ("run=", "size="), "ray_polyko_serve_requests_total": ("model=", "status="),
              "ray_polyko_serve_request_latency_seconds_bucket": ("model=", "le="),
              "ray_polyko_serve_resident_models": ("replica=",),
              "ray_polyko_serve_model_switches_total": ("model=",),
              "ray_polyko_serve_model_version": ("model=", "replica=")}
    for metric, needles in labels.items():
        assert any(all(n in line for n in needles) for line in series[metric]), (metric, series[metric][:2])
