"""Known-harmless third-party warnings are filtered in the driver and in every Ray worker of a
job, while real warnings still show. The warnings are the real ones (a pin_memory DataLoader on a
CPU, torch's quantized tensors, as EasyOCR triggers them), raised inside a Ray task of a Ray
started the way the jobs start it, and read from the driver's output as a user sees it."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

from curation.common.quiet import HARMLESS_LOGS, quiet_known_noise

REPO = Path(__file__).resolve().parents[1]
CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"

SCRIPT = f"""
import logging, time, warnings
import ray
from curation.common.jobs import init_ray

init_ray({{"num_cpus": 1}})

@ray.remote
def noisy():
    import torch
    from torch.utils.data import DataLoader
    list(DataLoader([1, 2], pin_memory=True))
    torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8)
    log = logging.getLogger("{CLEANER}")
    log.warning("Failed to query Ray Train Controller actor state. State API may be unavailable.")
    log.warning("Failed to clean up placement group: a real cleaner failure")
    warnings.warn("a real problem in a worker")
    logging.getLogger().setLevel(logging.INFO)  # as in Ray Train's workers
    import open_clip
    open_clip.get_tokenizer("RN50")  # logs "Parsing tokenizer identifier ..." at INFO
    logging.info("an info line of the job's own")
    return 1

ray.get(noisy.remote())
logging.getLogger("ray.data._internal.progress").warning("Progress bars disabled. To enable ...")
executor = logging.getLogger("ray.data._internal.execution.streaming_executor")
executor.info("\u2714\ufe0f  Dataset train_7 execution finished in 1.17 seconds")
executor.warning("\u26a0\ufe0f  Dataset train_8 execution failed")
warnings.warn("a real problem in the driver")
time.sleep(3)  # worker output reaches the driver asynchronously
ray.shutdown()
"""


def test_harmless_warnings_are_filtered_in_driver_and_workers_real_ones_show(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    # real warnings show, from the worker (so its output did reach the driver) and the driver
    assert "a real problem in a worker" in out and "a real problem in the driver" in out, out[-3000:]
    assert "a real cleaner failure" in out and "Dataset train_8 execution failed" in out, out[-3000:]
    assert "an info line of the job's own" in out, out[-3000:]
    for harmless in ("pin_memory", "quantize_per_tensor", "Failed to query Ray Train Controller",
                     "Progress bars disabled", "Dataset train_7", "Parsing tokenizer identifier"):
        assert harmless not in out, f"{harmless!r} was not filtered:\n{out[-3000:]}"


def test_filters_match_only_the_named_messages():
    import logging

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet_known_noise()
        warnings.warn("'pin_memory' argument is set as true but no accelerator is found, then ...")
        warnings.warn("'pin_memory' is something else entirely")
    assert [str(w.message) for w in seen] == ["'pin_memory' is something else entirely"]

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(CLEANER)
    logger.addHandler(handler)
    try:
        quiet_known_noise()  # twice: one filter per logger
        assert sum(type(f).__name__ == "_DropMessages" for f in logger.filters) == 1
        for start in HARMLESS_LOGS[CLEANER]:
            logger.warning(start + " and the rest of the line")
        logger.warning("Detected that the Ray Train controller actor is dead.")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["Detected that the Ray Train controller actor is dead."]
