"""Start or join a Ray cluster, never by accident.

A bare ``ray.init()`` attaches to any cluster already running on the machine (someone else's).
:func:`init_ray` joins a cluster only when told to (``address`` or ``RAY_ADDRESS``, which
``ray job submit`` sets for the job's driver); otherwise it starts a private local one on free
ports. Inside a Ray worker (a task or actor) it does nothing.
"""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    return ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus,
                    include_dashboard=include_dashboard, dashboard_host="127.0.0.1",
                    dashboard_port=free_port(), **kwargs)
