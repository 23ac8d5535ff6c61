"""Evaluate a checkpoint: zero-shot, retrieval, linear probe and few-shot probes.

    python pipelines/evaluate.py CHECKPOINT_FOLDER [key=value ...]          # a trainer checkpoint
    python pipelines/evaluate.py s3://bucket/runs/RUN/checkpoint_000003/    # ... in object storage
    python pipelines/evaluate.py CHECKPOINT --arch ViT-B-32 [--config FILE] [key=value ...]
    python pipelines/evaluate.py CHECKPOINT --model-config my_model.json eval.datasets=[digits]
    python pipelines/evaluate.py CHECKPOINT eval.suite=datacomp38 eval.wds_root=/data/wds  # a benchmark suite

CHECKPOINT is a local path or an fsspec URL (``s3://...``: the standard AWS_* variables and the
config's ``storage_options`` apply). A trainer checkpoint folder is evaluated as the model that
was trained: the recipe's model is rebuilt from ``meta.json`` and ``train_state.pt``, so CLIP 🚀
gets its weak, strong and ensemble embeddings and the numbers equal the trainer's end-of-training
evaluation (``--open-clip`` evaluates the folder's ``open_clip.pt`` instead). Any other file is
an open_clip checkpoint (a file with "state_dict", as open_clip_train saves it, or a bare state
dict): ``--arch`` is an open_clip architecture name, ``--model-config`` a JSON model config
registered under its file name. Files are read with ``weights_only=True`` (no arbitrary
unpickling). Prints the tables and writes the results as JSON (``eval.output``).

With ``eval.suite`` (``configs/eval/suites/<name>.yaml``) every task of the suite present under
``eval.wds_root`` is evaluated zero-shot (progress per task; a failing task is reported and the
rest go on), the missing ones are listed, and one table with the suite's average (DataComp's: over
all its tasks) and the average over the tasks present is printed and also written as CSV beside
the JSON (``<output>.<suite>.csv``). A suite replaces the default ``eval.datasets`` unless
``eval.datasets`` is given too.
"""

import argparse
import csv
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from curation.common.config import CONFIG_DIR, ConfigError, as_dict, build_config, user_error  # noqa: E402

DEFAULT = CONFIG_DIR / "eval" / "default.yaml"


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _image_size(model) -> int:
    size = model.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)


def load_embedder(checkpoint: str, arch: str | None = None, model_config: str | None = None,
                  device: str = "auto", open_clip_only: bool = False):
    """The evaluation embedder for ``checkpoint`` (path or URL); returns (embedder, image_size).

    A trainer checkpoint folder with a training config in its ``meta.json`` gives the recipe's own
    embedder (unless ``arch``/``model_config``/``open_clip_only``); everything else an
    :class:`OpenClipEmbedder` over the open_clip weights.
    """
    import open_clip

    from training import checkpoint as ck
    from training.evaluate import OpenClipEmbedder, preprocess_size
    from training.model import register_model_configs

    register_model_configs()  # the project's tiny architectures (configs/models/*.json)
    device = _device(device)
    try:
        folder = ck.is_dir(checkpoint)
        if folder and not (arch or model_config or open_clip_only) and ck.exists(ck.join(checkpoint, ck.STATE_FILE)) \
                and ck.exists(ck.join(checkpoint, ck.META_FILE)) and ck.read_meta(checkpoint).get("config"):
            recipe, model, _ = ck.load_trained_model(checkpoint, device=device)
            embedder = recipe.embedder(model, device=device)
            return embedder, preprocess_size(embedder.preprocess)
        if folder and not (arch or model_config or open_clip_only):
            print(f"note: {checkpoint} has no training config in meta.json (or no train_state.pt): "
                  "evaluating its open_clip.pt (for CLIP 🚀 checkpoints of older versions: the towers "
                  "without the recipe's projectors)")
        file = ck.open_clip_file(checkpoint) if folder else str(checkpoint)
        if not ck.exists(file):
            raise ValueError(f"checkpoint not found: {file}")
        if model_config:
            if not Path(model_config).is_file():
                raise ValueError(f"model config not found: {model_config}")
            open_clip.add_model_config(model_config)
            arch = arch or Path(model_config).stem
        if not arch and not ck.exists(ck.join(file.rsplit("/", 1)[0] if "/" in file else ".", ck.META_FILE)):
            raise ValueError("give the architecture: --arch NAME or --model-config FILE")
        arch = ck.open_clip_arch(file, arch)
        if arch not in open_clip.list_models():
            raise ValueError(f"unknown open_clip architecture {arch!r}")
        model, _, preprocess = open_clip.create_model_and_transforms(arch, device=device)
        state = ck.load_open_clip_state(file)
    except ck.UnsafeCheckpointError:
        raise
    except (OSError, KeyError) as exc:
        raise ValueError(f"cannot read {checkpoint}: {type(exc).__name__}: {exc}") from None
    try:
        incompatible = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # wrong shapes
        raise ValueError(f"cannot load {checkpoint} into {arch}: {str(exc)[:500]}") from None
    if incompatible.missing_keys:
        raise ValueError(f"{checkpoint} does not fit {arch}: {len(incompatible.missing_keys)} missing "
                         f"weights (e.g. {incompatible.missing_keys[:3]})")
    if incompatible.unexpected_keys:
        print(f"note: ignoring {len(incompatible.unexpected_keys)} checkpoint weights not in {arch} "
              f"(e.g. {incompatible.unexpected_keys[:3]})")
    return OpenClipEmbedder(model, preprocess, open_clip.get_tokenizer(arch), name="clip"), _image_size(model)


def _output_name(checkpoint: str) -> str:
    parts = [p for p in str(checkpoint).rstrip("/").split("/") if p]
    return Path(parts[-1]).stem if parts else "checkpoint"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="trainer checkpoint folder or open_clip checkpoint file (path or URL)")
    parser.add_argument("--arch", help="open_clip architecture name, e.g. ViT-B-32")
    parser.add_argument("--model-config", help="open_clip model config JSON (architecture = file name)")
    parser.add_argument("--open-clip", action="store_true",
                        help="evaluate a checkpoint folder's open_clip.pt, not the trained model")
    parser.add_argument("--config", help=f"YAML merged over {DEFAULT.relative_to(CONFIG_DIR.parent)}")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_intermixed_args(argv)
    from dataclasses import replace

    from training.eval_settings import parse_eval_job_config

    try:  # the typed view, parsed once before any work
        job = parse_eval_job_config(build_config(DEFAULT, args.config, args.overrides))
    except ConfigError as exc:
        user_error(exc)
    cfg = job.eval
    if cfg.suite and not _sets_datasets(args):
        cfg = replace(cfg, datasets=())  # the suite alone, unless datasets were asked for as well

    from curation.common.storage import Storage
    from training.evaluate import format_results, run_evaluation

    Storage.capture(job.storage_options).apply()  # AWS_* variables + storage_options for s3://
    try:
        embedder, image_size = load_embedder(args.checkpoint, args.arch, args.model_config, cfg.device,
                                             open_clip_only=args.open_clip)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    results = run_evaluation(embedder, cfg, image_size=image_size)
    print(format_results(results))
    out = Path(cfg.output or f"outputs/eval/{_output_name(args.checkpoint)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "arch": args.arch or args.model_config,
                               "config": as_dict(cfg), "results": results}, indent=2))
    print(f"wrote {out}")
    for res in results.values():
        if "suite" in res:
            print(f"wrote {write_suite_csv(res, out)}")
    ok = all("error" not in r and not r.get("failed") for r in results.values())
    return 0 if ok else 1


def _sets_datasets(args) -> bool:
    if any(o.split("=", 1)[0].strip() == "eval.datasets" for o in args.overrides):
        return True
    if args.config:
        from curation.common.config import load_yaml

        return "datasets" in ((load_yaml(args.config) or {}).get("eval") or {})
    return False


def write_suite_csv(res: dict, out: Path) -> Path:
    """The suite's table (one row per task, then the averages) as CSV beside the JSON."""
    from training.evaluate import suite_table_rows

    rows = suite_table_rows(res)
    path = out.with_name(f"{out.stem}.{res['suite']}.csv")
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


if __name__ == "__main__":
    sys.exit(main())
