"""Multi-GPU logic that runs on CPUs: the SyncBatchNorm decision, per-rank data sharding, and the
recipes' losses over two gloo workers against one process on the concatenated batch.

What already exists and is not repeated here: the loss *functions* across two gloo workers
(``test_train_units``: CLIP through DDP; ``test_losses_hnnce``: HN-NCE; ``test_losses_ssl``:
CLIP 🚀, Barlow Twins, SwALIP, SimCLR) and the SyncBatchNorm decision without a process group
(``test_improved_model``). Added here, in one two-process gloo group:

* the decision (``training.improved_model.should_sync_batchnorm``) *with* a 2-rank group: ``auto``
  keeps local BatchNorms on gloo (SyncBatchNorm cannot run on CPU tensors) and converts on NCCL,
  ``true`` converts, ``false`` never; the improved recipe's ``build_loss`` converts the SSL
  projector's BatchNorms accordingly (``build_model`` calls the same ``to_sync_batchnorm``);
* each recipe's whole loss as the training loop runs it (``TrainModule`` = model wrapper + recipe
  loss, wrapped in DDP): CLIP with label smoothing, DiHT (HN-NCE + the concept-distillation heads,
  some samples without targets) and CLIP 🚀 + SwALIP; the mean of the two ranks' losses and the
  DDP-averaged gradients (towers and distillation heads) equal one process on the global batch.
  (Small stand-in towers instead of open_clip models: the cross-rank logic is in the losses.)

Per-rank sharding (``ray_session``): the trainer's dataset (``training.data.build_dataset`` over
curated shards) split by Ray Train's ``DataConfig`` as ``training/train.py`` configures it gives
each of 2 ranks a disjoint, equal share covering every sample, and ``training.data.iter_batches``
yields the number of full batches per rank that ``training.train.plan_batches`` plans.
"""

from __future__ import annotations

import io
import math
import os
import tarfile
import threading

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from tests.gloo import free_port, process_group

WORLD = 2
GLOBAL_BATCH = 8
DIM = 16


# --- stand-in towers (open_clip's interface as the wrappers use it) -----------------------------------

class FakeClip(nn.Module):
    """``encode_image`` / ``encode_text`` / ``logit_scale`` / ``embed_dim`` like an open_clip CLIP."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.visual = nn.Linear(3 * 4 * 4, DIM)
        self.token = nn.Embedding(64, DIM)
        self.text_out = nn.Linear(DIM, DIM)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.embed_dim = DIM
        with torch.no_grad():
            for p in (self.visual.weight, self.visual.bias, self.token.weight, self.text_out.weight,
                      self.text_out.bias):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def encode_image(self, image, normalize: bool = False):
        x = self.visual(image.flatten(1))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text, normalize: bool = False):
        x = self.text_out(self.token(text).mean(1))
        return F.normalize(x, dim=-1) if normalize else x


def clip_wrapper():
    from training.model import ClipModel

    class Wrapper(ClipModel):  # ClipModel's forward / logit scale on the stand-in towers
        def __init__(self):
            nn.Module.__init__(self)
            self.clip, self.arch, self.pooled_dim = FakeClip(), "fake", DIM

    return Wrapper()


def improved_wrapper(mlp_layers: int = 1):
    from training.improved_model import ImprovedCLIP

    torch.manual_seed(1)
    return ImprovedCLIP(FakeClip(), {"proj_dim": 8, "mlp_hidden_dim": 12, "mlp_layers": mlp_layers})


def recipe_cfg(name: str, vocab_dir: str | None = None) -> dict:
    from curation.common.config import apply_overrides
    from training.train import default_config

    if name == "clip":
        return apply_overrides(default_config("clip"), ["loss.label_smoothing=0.1"])
    if name == "diht":
        return apply_overrides(default_config("diht"), [
            "loss.distill.enabled=true", f"loss.distill.concepts={vocab_dir}", "loss.hnnce.beta=0.5"])
    return apply_overrides(default_config("improved"), ["loss.ssl.name=swalip", "loss.label_smoothing=0"])


def write_vocab(folder: str) -> str:
    import json

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({"objects": [f"o{i}" for i in range(7)], "attributes": [f"a{i}" for i in range(5)],
                   "top_k": 3}, f)
    return folder


def build_module(name: str, vocab_dir: str):
    """``TrainModule(model, recipe.build_loss(model))`` as ``training.loop`` builds it."""
    from training.loop import TrainModule
    from training.recipes import get_recipe

    recipe = get_recipe(recipe_cfg(name, vocab_dir))
    model = improved_wrapper() if name == "improved" else clip_wrapper()
    torch.manual_seed(2)
    return TrainModule(model, recipe.build_loss(model))


def global_batch(name: str) -> dict:
    g = torch.Generator().manual_seed(3)
    b = {"image": torch.randn(GLOBAL_BATCH, 3, 4, 4, generator=g),
         "text": torch.randint(0, 64, (GLOBAL_BATCH, 6), generator=g)}
    if name == "diht":
        for prefix, n in (("obj", 7), ("attr", 5)):
            b[f"{prefix}_ids"] = torch.randint(0, n, (GLOBAL_BATCH, 3), generator=g)
            p = torch.rand(GLOBAL_BATCH, 3, generator=g)
            b[f"{prefix}_probs"] = p / p.sum(1, keepdim=True)
        # one sample per rank without targets: equal counts per rank, so the per-rank means average
        b["has_concepts"] = torch.tensor([True, True, False, True] * (GLOBAL_BATCH // 4))
    if name == "improved":
        b["image_strong"] = torch.randn(GLOBAL_BATCH, 2, 3, 4, 4, generator=g)
        b["text_strong"] = torch.randint(0, 64, (GLOBAL_BATCH, 2, 6), generator=g)
    return b


def local_rows(batch: dict, rank: int, world: int) -> dict:
    n = GLOBAL_BATCH // world
    return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}


def run_step(module: nn.Module, batch: dict) -> tuple[dict, dict]:
    """Forward + backward of the loop's step; (loss terms, gradients by name)."""
    terms = module(batch)
    terms["loss"].backward()
    inner = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
    grads = {n: p.grad.detach().clone() for n, p in inner.named_parameters() if p.grad is not None}
    return {k: v.detach().clone() for k, v in terms.items()}, grads


# --- the two-process gloo worker ----------------------------------------------------------------------

def _decisions(rank: int) -> dict:
    """The SyncBatchNorm decision with a live 2-rank gloo group (and a pretend NCCL backend)."""
    from training.improved_model import should_sync_batchnorm, to_sync_batchnorm
    from training.recipes import get_recipe

    out = {mode: should_sync_batchnorm(mode) for mode in ("auto", True, "true", False, "false", None)}
    model = improved_wrapper(mlp_layers=3)
    out["auto_is_same_module"] = to_sync_batchnorm(model, "auto") is model
    converted = to_sync_batchnorm(improved_wrapper(mlp_layers=3), True)
    out["true_sync_bns"] = sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    out["true_plain_bns"] = sum(type(m) is nn.BatchNorm1d for m in converted.modules())
    # the recipe's loss: SiamLIP's projector BatchNorms follow model.sync_bn
    from curation.common.config import apply_overrides
    from training.train import default_config

    for mode in ("auto", "true"):
        cfg = apply_overrides(default_config("improved"), ["loss.ssl.name=siamlip", f"model.sync_bn={mode}",
                                                           "loss.ssl.siamlip.hidden_dim=8",
                                                           "loss.ssl.siamlip.proj_dim=4"])
        loss = get_recipe(cfg).build_loss(improved_wrapper(mlp_layers=3))
        out[f"siamlip_sync_bns_{mode}"] = sum(isinstance(m, nn.SyncBatchNorm) for m in loss.modules())
    # SyncBatchNorm on CPU tensors: why ``auto`` must not convert on gloo
    try:
        converted.train()(global_batch("improved"))
        out["sync_bn_runs_on_cpu"] = True
    except (ValueError, RuntimeError):
        out["sync_bn_runs_on_cpu"] = False
    real = dist.get_backend
    dist.get_backend = lambda group=None: "nccl"  # the decision only reads the backend's name
    try:
        out["auto_on_nccl"] = should_sync_batchnorm("auto")
    finally:
        dist.get_backend = real
    return out


def _worker(rank, world, port, vocab_dir, out_dir):
    with process_group(rank, world, port):
        torch.set_num_threads(1)
        result = {"decisions": _decisions(rank)}
        for name in ("clip", "diht", "improved"):
            net = nn.parallel.DistributedDataParallel(build_module(name, vocab_dir))
            terms, grads = run_step(net, local_rows(global_batch(name), rank, world))
            result[name] = {"terms": terms, "grads": grads}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multigpu")
    vocab = write_vocab(str(tmp / "concepts"))
    mp.spawn(_worker, args=(WORLD, free_port(), vocab, str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], vocab


def test_sync_batchnorm_decision_with_a_two_rank_group(ranks):
    results, _ = ranks
    for r in results:
        d = r["decisions"]
        assert d["auto"] is False and d["auto_is_same_module"]   # gloo: keep per-rank BatchNorm
        assert d[True] is True and d["true"] is True            # forced
        assert d[False] is False and d["false"] is False and d[None] is False
        assert d["auto_on_nccl"] is True                        # GPU workers: converted
        assert d["true_sync_bns"] == 4 and d["true_plain_bns"] == 0  # 2 strong MLPs x 2 BatchNorms
        assert d["siamlip_sync_bns_auto"] == 0 and d["siamlip_sync_bns_true"] > 0
        assert d["sync_bn_runs_on_cpu"] is False  # why auto depends on the backend


@pytest.mark.parametrize("name", ["clip", "diht", "improved"])
def test_two_gloo_ranks_equal_one_process_on_the_concatenated_batch(ranks, name):
    results, vocab = ranks
    single_terms, single_grads = run_step(build_module(name, vocab), global_batch(name))
    r0, r1 = results[0][name], results[1][name]
    # each rank's loss is its rows against the gathered batch; their mean is the global loss
    torch.testing.assert_close((r0["terms"]["loss"] + r1["terms"]["loss"]) / 2, single_terms["loss"],
                               rtol=1e-5, atol=1e-6)
    if name == "diht":
        for term in ("contrastive", "distill"):
            torch.testing.assert_close((r0["terms"][term] + r1["terms"][term]) / 2, single_terms[term],
                                       rtol=1e-5, atol=1e-6)
        assert any(k.startswith("loss.distill.heads.") for k in single_grads)  # the heads are trained too
    # DDP averages gradients: every rank holds the single-process gradient
    assert set(r0["grads"]) == set(single_grads)
    for r in (r0, r1):
        for k, g in single_grads.items():
            torch.testing.assert_close(r["grads"][k], g, rtol=1e-4, atol=1e-6, msg=f"{name} d/d{k}")


# --- per-rank data sharding (Ray Train's split of the trainer's dataset) -------------------------------

def _write_shards(folder, shards: int, per_shard: int) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    keys = []
    for s in range(shards):
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                keys.append(key)
                for ext, data in (("jpg", b"\xff\xd8not-decoded"), ("txt", f"caption {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return keys


def test_each_rank_gets_a_disjoint_equal_share_covering_all(ray_session, tmp_path):
    import ray.train

    import training.train as train_mod
    from training.data import build_dataset, iter_batches

    keys = _write_shards(tmp_path / "shards", shards=4, per_shard=5)

    def keys_only(batch: dict) -> dict:  # nested: Ray pickles it by value (workers cannot import tests)
        return {"key": np.array([str(k) for k in batch["__key__"]], dtype=object),
                "n": np.ones(len(batch["__key__"]), np.int64)}

    data_cfg = {"train": str(tmp_path / "shards"), "map_batch_size": 8, "num_cpus": 0.5,
                "op_resource_reservation": False, "read_blocks": None}
    ds = build_dataset(data_cfg, keys_only, shuffle_files=True)
    make = getattr(train_mod, "data_config", None)  # how training/train.py configures the split
    config = make(ray.train.DataConfig, True) if make else ray.train.DataConfig()
    splits = config.configure({"train": ds}, world_size=WORLD, worker_handles=None, worker_node_ids=None)
    plan = train_mod.plan_batches(len(keys), global_batch=4, num_workers=WORLD, accum_steps=1, epochs=1)

    got: dict[int, list] = {}
    batches: dict[int, int] = {}

    def consume(rank):  # the ranks read their shards concurrently, as Ray Train workers do
        seen, n = [], 0
        for b in iter_batches(splits[rank]["train"], plan["local_batch_size"], prefetch_batches=1):
            seen += list(b["key"])
            n += 1
        got[rank], batches[rank] = seen, n

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(WORLD)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert set(got) == set(range(WORLD)), "a rank did not finish reading its shard"
    assert not set(got[0]) & set(got[1])                     # disjoint
    assert sorted(got[0] + got[1]) == sorted(keys)           # covering every sample
    assert len(got[0]) == len(got[1]) == len(keys) // WORLD  # equal shares
    assert batches[0] == batches[1] == plan["steps_per_epoch"]  # as many full batches as planned
