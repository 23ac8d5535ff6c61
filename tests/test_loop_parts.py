"""The pieces of ``training.loop.train_loop_per_worker``, each without Ray: the training step, the
log window, the eval schedule, the checkpoint reporter (+ resume from what it wrote) and the
failure-injection hooks. tests/test_train_ray.py runs them together on Ray Train."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from training.loop import (CheckpointReporter, DebugHooks, EvalSchedule, LogWindow, TrainModule, TrainStep,
                           replay, resume, step_metrics, take_batches)


class Linear(nn.Module):
    """A model wrapper as the recipes build them: ``forward(batch) -> outputs``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 1)
        self.clamped = 0

    def forward(self, batch):
        return {"y": self.fc(batch["x"]).squeeze(-1)}

    def clamp_logit_scale(self):
        self.clamped += 1


class SquaredError(nn.Module):
    def __init__(self):
        super().__init__()
        self.after = 0

    def forward(self, out, batch):
        loss = ((out["y"] - batch["t"]) ** 2).mean()
        return {"loss": loss, "half": loss.detach() / 2}

    def after_step(self):
        self.after += 1


def _parts(lr=0.1):
    torch.manual_seed(0)
    module = TrainModule(Linear(), SquaredError())
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return module, opt, sched, scaler


def _batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 3, generator=g), "t": torch.randn(n, generator=g)}


def test_train_step_accumulates_micro_batches_like_one_batch():
    """Two micro-batches of 4 = one batch of 8 (mean loss): same update, averaged terms, one
    scheduler step, one clamp and one ``after_step``."""
    a, b = _batch(4, 1), _batch(4, 2)
    whole = {k: torch.cat([a[k], b[k]]) for k in a}
    m1, o1, s1, sc1 = _parts()
    terms = TrainStep(m1, m1, o1, s1, sc1, torch.device("cpu"), grad_clip_norm=None)([a, b])
    m2, o2, s2, sc2 = _parts()
    TrainStep(m2, m2, o2, s2, sc2, torch.device("cpu"))([whole])
    assert torch.allclose(m1.model.fc.weight, m2.model.fc.weight, atol=1e-6)
    assert torch.allclose(m1.model.fc.bias, m2.model.fc.bias, atol=1e-6)
    assert set(terms) == {"loss", "half"} and terms["half"] == pytest.approx(terms["loss"] / 2)
    assert m1.model.clamped == 1 and m1.loss.after == 1 and s1.last_epoch == 1


def test_train_step_clips_gradients():
    m, o, s, sc = _parts(lr=1.0)
    before = torch.cat([p.detach().flatten() for p in m.parameters()])
    big = {"x": torch.full((4, 3), 100.0), "t": torch.zeros(4)}
    TrainStep(m, m, o, s, sc, torch.device("cpu"), grad_clip_norm=0.5)([big])
    after = torch.cat([p.detach().flatten() for p in m.parameters()])
    assert float((after - before).norm()) == pytest.approx(0.5, rel=1e-4)  # lr 1: the clipped gradient


def test_log_window_and_step_metrics():
    module, opt, _, _ = _parts()
    w = LogWindow()
    w.add(8, 1.0)
    w.add(8, 3.0)
    w.data_wait += 0.0
    row = step_metrics(w, {"loss": 3.0, "half": 1.5}, opt, module.model, epoch=2, total_steps=10)
    assert list(row) == ["train/loss", "train/lr", "train/samples_per_s", "train/data_wait_frac",
                         "train/half", "epoch", "total_steps"]
    assert row["train/loss"] == 2.0 and row["train/lr"] == 0.1 and row["train/samples_per_s"] > 0
    w.reset()
    assert w.samples == 0 and w.losses == [] and w.data_wait == 0.0


def test_eval_schedule():
    every2 = EvalSchedule(enabled=True, every_n_epochs=2)
    assert [e for e in range(1, 7) if every2.after_epoch(e, step=5, total_steps=10)] == [2, 4, 6]
    assert not every2.after_epoch(2, step=10, total_steps=10)  # the last step: only the final eval
    assert every2.at_end()
    off = EvalSchedule(enabled=False, every_n_epochs=1)
    assert not off.after_epoch(1, 1, 10) and not off.at_end()
    at_end_only = EvalSchedule(enabled=True, every_n_epochs=0)  # clip.yaml's schedule
    assert not at_end_only.after_epoch(1, 1, 10) and at_end_only.at_end()


def test_checkpoint_reporter_saves_reports_marks_and_resumes(tmp_path):
    module, opt, sched, scaler = _parts()
    calls = []

    def report_fn(metrics, checkpoint=None, checkpoint_dir_name=None):
        files = sorted(p.name for p in checkpoint.iterdir()) if checkpoint is not None else None
        calls.append((metrics, files, checkpoint_dir_name))
        if checkpoint is not None:  # what Ray Train uploads into the run folder
            import shutil

            shutil.copytree(checkpoint, tmp_path / "run" / checkpoint_dir_name)

    from pathlib import Path

    rep = CheckpointReporter(module=module, optimizer=opt, scheduler=sched, scaler=scaler, arch="toy",
                             recipe="clip", every=4, total_steps=10, is_main=True, run_url=str(tmp_path / "run"),
                             report_fn=report_fn, checkpoint_fn=Path)
    assert [s for s in range(1, 11) if rep.due(s)] == [4, 8]
    rep.report({"step": 3}, step=3, epoch=0, epoch_step=3, with_checkpoint=False)
    assert calls[-1] == ({"step": 3}, None, None) and rep.last_saved == -1
    rep.report({"step": 8}, step=8, epoch=1, epoch_step=2, with_checkpoint=True)
    assert calls[-1] == ({"step": 8}, ["meta.json", "train_state.pt"], "checkpoint_step_0000000008")
    folder = tmp_path / "run" / "checkpoint_step_0000000008"
    assert json.loads((folder / "checkpoint_complete.json").read_text()) == {"step": 8, "epoch": 1}
    assert json.loads((folder / "meta.json").read_text())["epoch_step"] == 2 and rep.last_saved == 8

    fresh, opt2, sched2, scaler2 = _parts()
    with torch.no_grad():
        fresh.model.fc.weight.add_(1.0)
    got = resume(fresh, opt2, sched2, scaler2, "cpu", None, str(tmp_path / "run"), log=calls.append)
    assert got == (8, 1, 2) and calls[-1] == "resumed from checkpoint at step 8 (epoch 1)"
    assert torch.equal(fresh.model.fc.weight, module.model.fc.weight)
    assert resume(fresh, opt2, sched2, scaler2, "cpu", None, str(tmp_path / "empty")) is None


def test_checkpoint_reporter_other_ranks_report_without_a_folder(tmp_path):
    module, opt, sched, scaler = _parts()
    calls = []
    rep = CheckpointReporter(module=module, optimizer=opt, scheduler=sched, scaler=scaler,
                             arch="toy", recipe="clip", every=0, total_steps=10, is_main=False,
                             run_url=str(tmp_path / "run"), checkpoint_fn=lambda d: d,
                             report_fn=lambda m, **kw: calls.append((m, kw)))
    assert not rep.due(4)  # checkpoint_every_steps unset: only at the end
    rep.report({"step": 10}, step=10, epoch=2, epoch_step=0, with_checkpoint=True)
    assert calls == [({"step": 10}, {"checkpoint": None, "checkpoint_dir_name": "checkpoint_step_0000000010"})]
    assert not (tmp_path / "run").exists() and rep.last_saved == 10


def test_debug_hooks_fail_once_on_rank0_and_pause(tmp_path):
    dcfg = {"dir": str(tmp_path), "fail_at_step": 3, "pause_at_step": 5, "pause_s": 0.1, "log_keys": True}
    rank1 = DebugHooks(dcfg, rank=1)
    rank1.maybe_fail(3)  # only rank 0 injects the failure
    rank0 = DebugHooks(dcfg, rank=0)
    rank0.maybe_fail(2)
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        rank0.maybe_fail(3)
    rank0.maybe_fail(3)  # once per run (the marker stays in debug.dir)
    rank0.maybe_pause(4)
    with pytest.raises(RuntimeError, match="nobody killed this worker"):
        rank0.maybe_pause(5)
    assert (tmp_path / "paused-at-5-rank0").exists() and (tmp_path / "worker-1.pid").exists()
    rank0.maybe_pause(5)  # once


def test_take_batches_and_replay_log_keys(tmp_path):
    debug = DebugHooks({"dir": str(tmp_path), "log_keys": True}, rank=0)
    it = iter([{"key": [f"k{i}"]} for i in range(5)])
    replay(it, 2, debug, first_step=7, epoch=1, accum=2)
    assert [b["key"] for b in take_batches(it, 2, debug, step=8, epoch=1)] == [["k2"], ["k3"]]
    assert len(take_batches(it, 2, debug, step=9, epoch=1)) == 1  # the shard ran out
    rows = [json.loads(line) for line in (tmp_path / "keys-rank0.jsonl").read_text().splitlines()]
    assert [(r["step"], r["keys"], r["skipped"]) for r in rows] == [
        (7, ["k0"], True), (7, ["k1"], True), (8, ["k2"], False), (8, ["k3"], False), (9, ["k4"], False)]


def test_build_objective_is_keyed_by_the_recipe():
    """One factory picks the main objective for every recipe; ``Recipe.build_loss`` is it."""
    from training import objective
    from training.recipes import ClipLossModule, get_recipe
    from training.settings import train_config
    from training.train import build_train_config

    cfg = build_train_config(None, ["model.arch=micro-vit-32"])
    recipe = get_recipe(cfg)
    loss = recipe.build_loss(recipe.build_model())
    assert isinstance(loss, ClipLossModule) and loss.label_smoothing == 0.0
    assert sorted(objective.OBJECTIVES) == ["clip", "diht", "improved"]
    for name in ("clip", "diht", "improved"):  # every recipe class inherits build_loss
        assert "build_loss" not in vars(type(get_recipe({**cfg, "recipe": name}))), name
    with pytest.raises(ValueError, match="no objective for recipe 'nope'"):
        objective.build_objective(replace(train_config(cfg), recipe="nope"), None)
