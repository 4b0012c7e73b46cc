"""A simulated GPU cluster on one machine, to check a run before paying for GPUs.

Real Ray nodes (one ``ray start`` raylet each, private temp dirs, free ports, all on 127.0.0.1): a CPU head
with no GPU (where ``ray job submit`` drivers run, as on ``cluster/ray-cluster.yaml`` and KubeRay) and GPU
worker nodes that *declare* GPUs and an accelerator type (``accelerator_type:H100``, what Ray itself adds on a
real GPU node) they do not have, plus the :data:`polyko.cluster.SIMULATED_RESOURCE` marker. Everything polyko
and Ray decide about a GPU cluster runs for real on it: the resources and accelerator type the driver reads,
the memory plan gate, the worker count derived from the GPUs, Ray's placement of workers on nodes, elastic
shrink and grow when a node stops (:meth:`SimCluster.remove_node`) or joins (:meth:`SimCluster.add_node`).
Only the kernels are not: a training run on it needs ``--simulated-gpus`` (``scaling.simulate_gpus``),
with which each worker reserves one of the Ray GPUs but computes on CPU with gloo. polyko refuses that
switch on a cluster whose GPU nodes lack the marker, so it can never silently apply in production.

    python -m polyko.simcluster --nodes 2 --gpus-per-node 8 --accelerator H100    # until Ctrl-C
    # then, in another shell, with the two variables it prints:
    python jobs/pretrain.py --size 12.8b --dry-run      # the plan, workers per node, checkpoint costs; exits

Each node costs ~0.3-0.5 GB of RAM (raylet, agents) and no CPU while idle. Library use (the tests)::

    with SimCluster() as c:
        c.add_node(gpus=8, accelerator="H100")
        ray.init(address=c.address)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from polyko.cluster import ACCELERATOR_RESOURCE_PREFIX, SIMULATED_RESOURCE, free_port
from polyko.cluster import stop_process_group

# Ray accelerator type strings (ray.util.accelerators) that polyko.plan knows.
ACCELERATORS = ("A100-40G", "A100-80G", "H100", "H200")
START_TIMEOUT_S = 600  # a raylet must register with the GCS: seconds when quiet, minutes on a loaded machine


def _ray_bin() -> str:
    return str(Path(sys.executable).parent / "ray")


def _agent_ports() -> list[str]:
    # Several nodes on one machine need their own agent/metrics ports (the defaults would clash).
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


class SimCluster:
    """A head plus simulated GPU nodes, each a ``ray start --block`` process group of its own (stopping the
    group is losing the node). ``env``: extra environment of every node (and so of the Ray workers on it)."""

    def __init__(self, root: str | os.PathLike | None = None, *, env: dict[str, str] | None = None,
                 head_cpus: int = 0):
        # Unix socket paths are limited to ~107 bytes: keep the temp root short.
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="pksim", dir="/tmp"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
                        # `ray start --head` turns token authentication on by default in Ray 2.60; a private
                        # cluster on 127.0.0.1 opts out (clients then need RAY_AUTH_MODE=disabled too).
                        RAY_AUTH_MODE="disabled",
                        # Many raylets starting on one busy machine can miss Ray's 30 s registration window.
                        RAY_raylet_start_wait_time_s="180", **(env or {}))
        self.env.pop("RAY_ADDRESS", None)
        self.port, self.dashboard_port = free_port(), free_port()
        self.head_cpus = head_cpus
        self.head: subprocess.Popen | None = None
        self.nodes: list[subprocess.Popen | None] = []
        self._gcs = None

    @property
    def address(self) -> str:
        """GCS address (``ray.init(address=...)``, ``--ray-address``)."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """Job submission address (``ray job submit --address ...``)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, args: list[str], log: Path) -> subprocess.Popen:
        return subprocess.Popen([_ray_bin(), "start", "--block", "--disable-usage-stats", *args],
                                stdout=open(log, "w"), stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True)

    def _count(self) -> int:
        """Alive nodes, as the GCS counts them (0 while the head is not up)."""
        from ray._raylet import GcsClient
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        try:
            # A client made before the GCS listens never connects: keep one only once it has answered.
            gcs = self._gcs or GcsClient(address=self.address)
            n = len(gcs.get_all_node_info(timeout=10, state_filter=GcsNodeInfo.GcsNodeState.ALIVE))
        except Exception:  # noqa: BLE001 - not up yet (connection refused, timeout)
            return 0
        if n:
            self._gcs = gcs
        return n

    def start(self) -> "SimCluster":
        """Start the head (no GPU, ``head_cpus`` CPUs) and wait for its GCS."""
        self.head = self._start(["--head", f"--num-cpus={self.head_cpus}", "--num-gpus=0", f"--port={self.port}",
                                 f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
                                 f"--ray-client-server-port={free_port()}", f"--temp-dir={self.root / 'head'}",
                                 *_agent_ports()], self.root / "head.log")
        deadline = time.time() + START_TIMEOUT_S
        while self._count() < 1:
            if self.head.poll() is not None or time.time() > deadline:
                log = (self.root / "head.log").read_text()[-3000:]
                self.stop()
                raise RuntimeError("simulated cluster head did not start:\n" + log)
            time.sleep(2)
        return self

    def add_node(self, *, gpus: int = 8, accelerator: str = "H100", cpus: int | None = None,
                 memory_gib: float | None = None) -> int:
        """Start a node declaring ``gpus`` GPUs of Ray accelerator type ``accelerator`` and ``cpus`` CPUs
        (default one per GPU, for the workers' ``cpus_per_worker``); waits until the cluster counts it.
        Returns its index (for :meth:`remove_node`)."""
        assert self.head is not None, "start() first"
        cpus = gpus if cpus is None else cpus
        resources = {SIMULATED_RESOURCE: gpus} if gpus else {}
        if gpus and accelerator:
            resources[ACCELERATOR_RESOURCE_PREFIX + accelerator] = 1
        i = len(self.nodes)
        before = self._count()
        args = [f"--address={self.address}", f"--num-cpus={cpus}", f"--num-gpus={gpus}",
                f"--resources={json.dumps(resources)}", f"--temp-dir={self.root / f'n{i}'}", *_agent_ports()]
        if memory_gib:
            args.append(f"--memory={int(memory_gib * 2**30)}")
        for attempt in range(3):  # a raylet that still fails to register (a very loaded machine): retry
            proc = self._start(args, self.root / f"n{i}-{attempt}.log")
            deadline = time.time() + START_TIMEOUT_S
            while proc.poll() is None and time.time() < deadline and self._count() <= before:
                time.sleep(2)
            if proc.poll() is None and self._count() > before:
                self.nodes.append(proc)
                return i
            stop_process_group(proc)
        raise RuntimeError(f"simulated node {i} did not join:\n" + (self.root / f"n{i}-2.log").read_text()[-3000:])

    def remove_node(self, i: int) -> None:
        """Stop node ``i`` and every process on it at once (a lost machine)."""
        proc = self.nodes[i]
        if proc is not None:
            stop_process_group(proc)
            self.nodes[i] = None

    def stop(self) -> None:
        for proc in [*self.nodes, self.head]:
            if proc is not None:
                stop_process_group(proc)
        self.nodes, self.head = [], None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "SimCluster":
        return self.start() if self.head is None else self

    def __exit__(self, *exc) -> None:
        self.stop()



def start(nodes: int = 2, gpus_per_node: int = 8, accelerator: str = "H100", *, cpus_per_node: int | None = None,
          env: dict[str, str] | None = None) -> SimCluster:
    """A started cluster: a CPU head plus ``nodes`` nodes of ``gpus_per_node`` simulated ``accelerator`` GPUs."""
    if accelerator not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {accelerator!r}; choose one of {ACCELERATORS}")
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError("need at least one node with at least one GPU")
    c = SimCluster(env=env).start()
    try:
        for _ in range(nodes):
            c.add_node(gpus=gpus_per_node, accelerator=accelerator, cpus=cpus_per_node)
    except BaseException:
        c.stop()
        raise
    return c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m polyko.simcluster", description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=2, help="GPU worker nodes")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--accelerator", default="H100", choices=ACCELERATORS, help="Ray accelerator type of the GPUs")
    ap.add_argument("--cpus-per-node", type=int, default=None, help="default: one per GPU")
    a = ap.parse_args(argv)
    c = start(a.nodes, a.gpus_per_node, a.accelerator, cpus_per_node=a.cpus_per_node)
    print(f"simulated cluster up: a CPU head + {a.nodes} x {a.gpus_per_node} {a.accelerator} (simulated) nodes\n"
          f"  export RAY_ADDRESS={c.address} RAY_AUTH_MODE=disabled\n"
          f"  python jobs/pretrain.py --size 12.8b --dry-run\n"
          f"  ray job submit --address {c.dashboard_url} --working-dir . -- python jobs/pretrain.py --size 12.8b "
          f"--dry-run\n"
          f"Ctrl-C stops it.", flush=True)
    try:
        while all(p is not None and p.poll() is None for p in [c.head, *c.nodes]):
            time.sleep(1)
        print("a node of the simulated cluster exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        c.stop()


if __name__ == "__main__":
    raise SystemExit(main())
