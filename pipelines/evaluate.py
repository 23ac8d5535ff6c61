"""Evaluate an open_clip checkpoint: zero-shot, retrieval, linear probe and few-shot probes.

    python pipelines/evaluate.py CHECKPOINT --arch ViT-B-32 [--config FILE] [key=value ...]
    python pipelines/evaluate.py CHECKPOINT --model-config my_model.json eval.datasets=[digits]

CHECKPOINT is an open_clip checkpoint (a file with "state_dict", as open_clip_train and this
project's trainer save it, or a bare state dict). ``--arch`` is an open_clip architecture name;
``--model-config`` a JSON model config (as in open_clip's model_configs/) registered under its
file name. Prints the tables and writes the results as JSON (``eval.output``).
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from curation.config import CONFIG_DIR, ConfigError, build_config  # noqa: E402

DEFAULT = CONFIG_DIR / "eval" / "default.yaml"


def load_embedder(checkpoint: str, arch: str | None = None, model_config: str | None = None,
                  device: str = "auto"):
    """An :class:`OpenClipEmbedder` for ``checkpoint``; returns (embedder, image_size)."""
    import open_clip
    import torch

    from training.evaluate import OpenClipEmbedder
    from training.model import register_model_configs

    register_model_configs()  # the project's tiny architectures (configs/models/*.json)
    if Path(checkpoint).is_dir() and (Path(checkpoint) / "open_clip.pt").is_file():
        folder = Path(checkpoint)  # a trainer checkpoint folder: its meta.json names the arch
        checkpoint = str(folder / "open_clip.pt")
        if not arch and not model_config and (folder / "meta.json").is_file():
            arch = json.loads((folder / "meta.json").read_text()).get("arch")
    if model_config:
        if not Path(model_config).is_file():
            raise ValueError(f"model config not found: {model_config}")
        open_clip.add_model_config(model_config)
        arch = arch or Path(model_config).stem
    if not arch:
        raise ValueError("give the architecture: --arch NAME or --model-config FILE")
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r}")
    if not Path(checkpoint).is_file():
        raise ValueError(f"checkpoint not found: {checkpoint}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _, preprocess = open_clip.create_model_and_transforms(arch, device=device)
    try:
        incompatible = open_clip.load_checkpoint(model, checkpoint, strict=False, device=device)
    except Exception as exc:  # unpicklable / not a checkpoint / wrong shapes
        raise ValueError(f"cannot load {checkpoint} into {arch}: {exc}") from None
    if incompatible.missing_keys:
        raise ValueError(f"{checkpoint} does not fit {arch}: {len(incompatible.missing_keys)} missing "
                         f"weights (e.g. {incompatible.missing_keys[:3]})")
    if incompatible.unexpected_keys:
        print(f"note: ignoring {len(incompatible.unexpected_keys)} checkpoint weights not in {arch} "
              f"(e.g. {incompatible.unexpected_keys[:3]})")
    size = model.visual.image_size
    image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
    return OpenClipEmbedder(model, preprocess, open_clip.get_tokenizer(arch), name="clip"), image_size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="open_clip checkpoint file")
    parser.add_argument("--arch", help="open_clip architecture name, e.g. ViT-B-32")
    parser.add_argument("--model-config", help="open_clip model config JSON (architecture = file name)")
    parser.add_argument("--config", help=f"YAML merged over {DEFAULT.relative_to(CONFIG_DIR.parent)}")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = build_config(DEFAULT, args.config, args.overrides)["eval"]
    except ConfigError as exc:
        parser.error(str(exc))

    from training.evaluate import format_results, run_evaluation

    try:
        embedder, image_size = load_embedder(args.checkpoint, args.arch, args.model_config, cfg["device"])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    results = run_evaluation(embedder, cfg, image_size=image_size)
    print(format_results(results))
    out = Path(cfg["output"] or f"outputs/eval/{Path(args.checkpoint).stem}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "arch": args.arch or args.model_config,
                               "config": cfg, "results": results}, indent=2))
    print(f"wrote {out}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
