"""Known-harmless third-party noise, filtered where the jobs start, so that the funnel, the step
lines and the evaluation stand out while real warnings still show.

Each entry names one message that a job prints on every run and that says nothing about the
user's data or settings. Filters match the start of the message only; anything else, including
other warnings from the same libraries, still shows. :func:`quiet_known_noise` installs them in
the current process; :data:`WORKER_SETUP_HOOK` names it for Ray's ``worker_process_setup_hook``,
so every worker process of the job (Ray Data actors, Ray Train workers, the Train controller and
its placement-group cleaner) installs them too, on a local Ray and under ``ray job submit``.
"""

from __future__ import annotations

import logging
import re
import warnings

WORKER_SETUP_HOOK = "curation.common.quiet.quiet_known_noise"

# (message start, category): Python warnings
HARMLESS_WARNINGS = (
    # EasyOCR's recognizer builds a DataLoader with pin_memory=True; on a CPU worker it is unused
    ("'pin_memory' argument is set as true but no accelerator is found", UserWarning),
    # EasyOCR quantizes its recognizer for CPU with torch's (deprecated) quantized tensors
    ("torch.quantize_per_tensor, torch.quantize_per_channel and other quantized tensor", UserWarning),
    # Ray Train's own data setup still sets this option of Ray Data
    ("`ExecutionOptions.exclude_resources` is deprecated", DeprecationWarning),
)

# logger name -> message starts: log records from third-party loggers
HARMLESS_LOGS = {
    # said once per run when the job turns Ray Data's bars off (progress=false, or in training)
    "ray.data._internal.progress": ("Progress bars disabled",),
    # Ray Train's placement-group cleaner polls the controller through the state API and warns
    # at every poll that fails while the cluster is busy or shutting down; it keeps monitoring
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": (
        "Failed to query Ray Train Controller actor state",),
    # one line per dataset run: in training, one per epoch (a failed run's line still shows)
    "ray.data._internal.execution.streaming_executor": ("\u2714\ufe0f  Dataset ",),
}

# open_clip logs its model-creation steps at INFO on the root logger ("Parsing model identifier",
# "Loaded built-in ... config", "Model ... creation process complete", ...), which Ray Train's
# workers print; its warnings and errors still show
QUIET_INFO_FROM = ("open_clip",)


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to hide
            return True
        return not message.startswith(self.starts)


class _DropInfoFrom(logging.Filter):
    def __init__(self, packages: tuple[str, ...]):
        super().__init__()
        self.parts = tuple(f"{p}/" for p in packages)

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace("\\", "/")
        return record.levelno >= logging.WARNING or not any(part in path for part in self.parts)


def quiet_known_noise() -> None:
    """Install the filters in this process (idempotent)."""
    for start, category in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start), category=category)
    for name, starts in HARMLESS_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(starts))
    root = logging.getLogger()
    if not any(isinstance(f, _DropInfoFrom) for f in root.filters):
        root.addFilter(_DropInfoFrom(QUIET_INFO_FROM))
