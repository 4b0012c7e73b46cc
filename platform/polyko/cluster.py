"""Start or join a Ray cluster, never by accident.

A bare ``ray.init()`` attaches to any cluster already running on the machine (someone else's).
:func:`init_ray` joins a cluster only when told to (``address`` or ``RAY_ADDRESS``, which
``ray job submit`` sets for the job's driver); otherwise it starts a private local one on free
ports. Inside a Ray worker (a task or actor) it does nothing.

:func:`inventory` says what the joined cluster has (nodes, CPUs, GPUs and their Ray accelerator type,
simulated or real): what ``pretrain`` sizes a run from, instead of the driver's own devices.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


def stop_process_group(proc, grace_s: float = 30) -> None:
    """SIGTERM the process group a ``subprocess.Popen(..., start_new_session=True)`` leads (a raylet and
    its workers, a converter and its pool), SIGKILL it if it lingers past ``grace_s`` seconds."""
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The driver's lineage budget on a private local cluster (Ray's default: 1 GB).
LOCAL_LINEAGE_BYTES = 64 << 20


def init_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
             include_dashboard: bool = True, **kwargs):
    """Join ``address``/``$RAY_ADDRESS`` if given, else start a private local cluster.

    ``num_cpus``/``num_gpus`` apply to a local cluster only. Returns ``ray.init``'s context.
    The dashboard (needed by Train V2's bookkeeping and by ``ray job``) gets a free port.
    """
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    address = address or os.environ.get("RAY_ADDRESS")
    # A local cluster's workers inherit the driver's environment (HF_HUB_OFFLINE and friends).
    # Rust tokenizers in many Ray workers at once must not each spawn a thread per core.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if address:
        return ray.init(address=address, **kwargs)
    # Lineage (task specs kept to rebuild lost objects) is of no use on one node -- an object is lost
    # only with the node, and then so is everything -- but the driver holds up to 1 GB of it by default:
    # +150 MB over a corpus pipeline run at 11M documents.
    system = {"max_lineage_bytes": LOCAL_LINEAGE_BYTES, **kwargs.pop("_system_config", {})}
    return ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus,
                    include_dashboard=include_dashboard, dashboard_host="127.0.0.1",
                    dashboard_port=free_port(), _system_config=system, **kwargs)


# --------------------------------------------------------------------------------------- inventory

# Ray's own resource for a node's accelerator (``accelerator_type:H100: 1`` on every GPU node, detected from
# NVML, or declared by the cluster launcher / KubeRay / ``ray start --resources``), and its node label.
ACCELERATOR_RESOURCE_PREFIX = "accelerator_type:"
ACCELERATOR_LABEL = "ray.io/accelerator-type"
# Declared (amount = its GPUs) only by the GPU nodes of a polyko.simcluster cluster: GPUs Ray can schedule
# that are not there. Nothing requests it; scaling.simulate_gpus is refused on nodes without it.
SIMULATED_RESOURCE = "polyko_simulated_gpus"


@dataclass(frozen=True)
class Node:
    """One alive Ray node, as the cluster's GCS reports it (``ray.nodes()``)."""

    node_id: str
    ip: str
    cpus: float
    gpus: float
    memory_bytes: float          # Ray's schedulable memory on the node (host RAM for tasks/actors)
    accelerator: str | None      # Ray accelerator type of its GPUs ("H100", "A100-80G", ...)
    simulated: bool


@dataclass(frozen=True)
class Inventory:
    """What the connected Ray cluster has now (after :func:`init_ray`): GPUs are counted on the cluster's
    nodes, never on the driver (``ray job submit`` drivers run on a CPU head)."""

    nodes: tuple[Node, ...]

    @property
    def gpu_nodes(self) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.gpus > 0)

    @property
    def gpus(self) -> int:
        return int(sum(n.gpus for n in self.gpu_nodes))

    @property
    def accelerators(self) -> list[str]:
        """Distinct accelerator types of the GPU nodes (sorted; ``"unknown"`` for GPUs without one)."""
        return sorted({n.accelerator or "unknown" for n in self.gpu_nodes})

    @property
    def simulated(self) -> bool:
        """Every GPU node is a simulated one (polyko.simcluster), and there is at least one."""
        return bool(self.gpu_nodes) and all(n.simulated for n in self.gpu_nodes)

    def gpus_of(self, accelerator: str | None) -> int:
        """GPUs on the nodes of one accelerator type (``None``: all)."""
        return int(sum(n.gpus for n in self.gpu_nodes if accelerator is None or n.accelerator == accelerator))

    def describe(self) -> str:
        gpu = ", ".join(f"{self.gpus_of(a if a != 'unknown' else None)} x {a}" for a in self.accelerators)
        kind = " (simulated GPUs)" if self.simulated else ""
        return (f"{len(self.nodes)} nodes: {sum(n.cpus for n in self.nodes):g} CPUs, "
                f"{gpu or 'no GPUs'}{kind}")


def inventory() -> Inventory:
    """The alive nodes of the cluster this process is connected to (``ray.nodes()``)."""
    import ray

    nodes = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {}) or {}
        labels = n.get("Labels", {}) or {}
        acc = labels.get(ACCELERATOR_LABEL) or next(
            (k[len(ACCELERATOR_RESOURCE_PREFIX):] for k in res if k.startswith(ACCELERATOR_RESOURCE_PREFIX)), None)
        nodes.append(Node(node_id=n["NodeID"], ip=n.get("NodeManagerAddress", "?"), cpus=float(res.get("CPU", 0)),
                          gpus=float(res.get("GPU", 0)), memory_bytes=float(res.get("memory", 0)), accelerator=acc,
                          simulated=res.get(SIMULATED_RESOURCE, 0) > 0))
    return Inventory(tuple(sorted(nodes, key=lambda x: (x.gpus, x.ip, x.node_id))))
