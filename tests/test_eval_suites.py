"""Benchmark suites: DataComp's 38 tasks as data, a suite run over a root holding two generated tasks
(the other 36 listed as missing, both averages printed and written), a failing task that does not
stop the others, ImageNet with open_clip's class names and templates, and the flat metrics the
trainer logs (``summary_metrics`` / ``training.loop.headline``)."""

import csv
import json
import re

import pytest
from test_eval_clip_benchmark import (ARCH, load_job, tiny_checkpoint, write_classification_wds,
                                      write_retrieval_wds)

from training.eval_data import (EvalDataError, find_task_folder, load_suite, open_clip_imagenet,
                                suite_task_dataset)
from training.evaluate import format_suite, run_evaluation, suite_averages, summary_metrics

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
COCO_KEY = "retrieval/mscoco_2014_5k_test_image_text_retrieval"


@pytest.fixture
def two_task_root(tmp_path):
    """A root of CLIP_benchmark wds folders holding two of DataComp's tasks: CIFAR-10 (generated,
    its 10 class names) and MSCOCO retrieval (generated captions)."""
    root = tmp_path / "wds"
    write_classification_wds(root / "wds_cifar10", classes=CIFAR10, counts=[3, 2, 2, 2, 2, 2, 2, 2, 2, 1],
                             templates=["a photo of a {c}.", "a blurry photo of a {c}."], seed=3)
    write_retrieval_wds(root / "wds_mscoco_captions", n_images=10, seed=4)
    return root


def test_datacomp38_and_retrieval_suites_as_data():
    suite = load_suite("datacomp38")
    keys = [t["key"] for t in suite["tasks"]]
    assert len(keys) == 38 == len(set(keys))
    assert "fairness/fairface" not in keys and "fairness/utkface" not in keys  # no main metric in DataComp
    by_key = {t["key"]: t for t in suite["tasks"]}
    assert by_key["imagenet1k"]["metadata"] == "open_clip_imagenet"
    assert by_key["vtab/pets"]["main_metric"] == "mean_per_class_recall"
    assert by_key[COCO_KEY]["dataset"] == "mscoco_captions" and by_key[COCO_KEY]["main_metric"] == "mean_recall@1"
    assert sum(t["task"] == "zeroshot_retrieval" for t in suite["tasks"]) == 2
    assert len(suite["groups"]["VTAB"]) == 13
    retrieval = load_suite("retrieval")
    assert [t["dataset"] for t in retrieval["tasks"]] == ["mscoco_captions", "flickr30k"]
    with pytest.raises(EvalDataError, match="unknown eval suite"):
        load_suite("no_such_suite")


def test_suite_run_over_two_generated_tasks(two_task_root, tmp_path, capsys, one_thread):
    ckpt = tiny_checkpoint(tmp_path / "epoch_1.pt")
    out = tmp_path / "eval" / "res.json"
    job = load_job()
    rc = job.main([str(ckpt), "--arch", ARCH, "eval.suite=datacomp38", f"eval.wds_root={two_task_root}",
                   "eval.batch_size=8", "eval.device=cpu", f"eval.output={out}"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["suite/datacomp38"]  # the suite alone: no digits / demo
    res = results["suite/datacomp38"]
    ok = [k for k, t in res["tasks"].items() if t["status"] == "ok"]
    assert ok == ["cifar10", COCO_KEY]
    assert len(res["missing"]) == 36 and "imagenet1k" in res["missing"] and not res["failed"]
    cifar, coco = res["tasks"]["cifar10"], res["tasks"][COCO_KEY]
    assert cifar["result"]["num_test"] == 20 and coco["result"]["num_test"] == 10
    assert cifar["main"]["clip"] == cifar["result"]["zeroshot"]["clip"]["acc1"]
    r = coco["result"]["retrieval"]["clip"]
    assert coco["main"]["clip"] == pytest.approx((r["image_retrieval_recall@1"] + r["text_retrieval_recall@1"]) / 2)
    avg = res["averages"]["clip"]
    assert avg["average"] is None and avg["num_present"] == 2 and avg["num_tasks"] == 38
    assert avg["average_present"] == pytest.approx((cifar["main"]["clip"] + coco["main"]["clip"]) / 2)
    # progress per task, the missing list and both averages on screen
    assert "[2/38] cifar10: acc1" in printed and f"[32/38] {COCO_KEY}: mean_recall@1" in printed
    assert "missing (36 of 38): vtab/caltech101, vtab/cifar100" in printed
    assert f"{COCO_KEY:<50} MSCOCO" in printed  # the table's row
    table = printed[printed.index("== suite/datacomp38 =="):]
    assert re.search(r"average over all 38 tasks \(DataComp\) +n/a +\(n/a: 36 of 38 tasks without a result\)", table)
    assert re.search(rf"average over the 2 tasks present +{100 * avg['average_present']:.1f}\n", table)
    # ... and the same table written as CSV beside the JSON
    rows = list(csv.DictReader(open(out.with_name("res.datacomp38.csv"))))
    assert len(rows) == 38 + 2 + 4  # tasks, the two averages, DataComp's four groups
    by_key = {row["key"]: row for row in rows}
    assert by_key["cifar10"]["status"] == "ok" and float(by_key["cifar10"]["clip"]) == cifar["main"]["clip"]
    assert by_key["vtab/dtd"]["status"] == "missing" and by_key["vtab/dtd"]["clip"] == ""
    assert float(by_key["average_present"]["clip"]) == pytest.approx(avg["average_present"])
    assert by_key["average"]["clip"] == "" and by_key["average"]["status"] == "36 tasks without a result"


def test_run_evaluation_reports_a_failing_task_and_goes_on_and_logs_suite_metrics(two_task_root, tmp_path, one_thread):
    """What the trainer calls every N epochs: run_evaluation honours eval.suite / eval.wds_root and
    summary_metrics gives each task's main metric and the averages (the keys loop.py logs)."""
    broken = two_task_root / "wds_vtab-dtd" / "test"
    broken.mkdir(parents=True)
    (broken / "nshards.txt").write_text("1\n")
    (broken / "0.tar").write_bytes(b"not a tar file" * 10)
    (two_task_root / "wds_vtab-dtd" / "classnames.txt").write_text("banded\nbubbly\n")
    write_classification_wds(two_task_root / "wds_wilds-iwildcam_test", classes=["deer", "fox", "empty", "boar", "owl"],
                             counts=[3, 2, 2, 1, 1], templates=["a camera trap photo of a {c}."], seed=5)
    wino = two_task_root / "wds_misc-winogavil_test" / "test"  # present, but WinoGAViL is not computed here
    wino.mkdir(parents=True)
    (wino / "nshards.txt").write_text("1\n")
    # GeoDE as DataComp ships it: .npy metadata [region, country] per sample; main metric acc_wg
    regions = [0, 1, 2, 1, 0, 2, 2, 1, 0, 1, 2, 0]
    write_classification_wds(two_task_root / "wds_geode_test", classes=["bag", "car", "dog", "hat", "pen"],
                             counts=[3, 3, 2, 2, 2], templates=["a photo of a {c}."], seed=6,
                             metadata=lambda i: [regions[i], 10 + i])
    job = load_job()
    embedder, size = job.load_embedder(str(tiny_checkpoint(tmp_path / "ckpt.pt")), arch=ARCH, device="cpu")
    logs = []
    cfg = {"datasets": [], "suite": "datacomp38", "wds_root": str(two_task_root), "batch_size": 8,
           "recall_at": [5], "linear_probe": {"enabled": True}, "fewshot": {"enabled": True}}
    results = run_evaluation(embedder, cfg, image_size=size, log=logs.append)
    res = results["suite/datacomp38"]
    assert res["failed"] == ["vtab/dtd"] and "no samples" in res["tasks"]["vtab/dtd"]["error"]
    assert res["unsupported"] == ["misc/winogavil"] and "WinoGAViL" in res["tasks"]["misc/winogavil"]["error"]
    assert [k for k, t in res["tasks"].items() if t["status"] == "ok"] == \
        ["cifar10", COCO_KEY, "wilds/iwildcam", "fairness/geode"]
    assert len(res["missing"]) == 32
    wild = res["tasks"]["wilds/iwildcam"]  # DataComp's F1-macro_all: macro F1 over the classes present
    assert wild["main"]["clip"] == wild["result"]["zeroshot"]["clip"]["macro_f1"]
    geode = res["tasks"]["fairness/geode"]  # acc_wg: the worst accuracy over the 3 regions
    zs = geode["result"]["zeroshot"]["clip"]
    assert geode["main"]["clip"] == zs["worst_group_acc1"] and zs["num_groups"] == 3
    assert zs["worst_group_acc1"] <= zs["acc1"]
    assert any("[7/38] vtab/dtd: failed" in line for line in logs)
    assert "linear_probe" not in res["tasks"]["cifar10"]["result"]  # suite tasks are zero-shot only
    assert "image_retrieval_recall@1" in res["tasks"][COCO_KEY]["result"]["retrieval"]["clip"]  # k=1 added

    flat = summary_metrics(results)
    assert set(flat) == {"datacomp38/cifar10/clip/acc1",
                         "datacomp38/retrieval-mscoco_2014_5k_test_image_text_retrieval/clip/mean_recall@1",
                         "datacomp38/wilds-iwildcam/clip/F1-macro_all", "datacomp38/fairness-geode/clip/acc_wg",
                         "datacomp38/average_present/clip"}
    assert flat["datacomp38/cifar10/clip/acc1"] == res["tasks"]["cifar10"]["main"]["clip"]
    assert flat["datacomp38/average_present/clip"] == res["averages"]["clip"]["average_present"]

    from training.loop import headline  # what the trainer logs to TensorBoard and metrics.jsonl

    assert headline(results) == pytest.approx(flat)

    # an unreadable suite is an error entry, not a crash
    bad = run_evaluation(embedder, {"datasets": [], "suite": "nope"}, image_size=size, log=logs.append)
    assert "unknown eval suite" in bad["suite/nope"]["error"]
    bad = run_evaluation(embedder, {"datasets": [], "suite": "retrieval"}, image_size=size, log=logs.append)
    assert "needs eval.wds_root" in bad["suite/retrieval"]["error"]
    bad = run_evaluation(embedder, {"datasets": [], "suite": "retrieval", "wds_root": str(tmp_path / "nowhere")},
                         image_size=size, log=logs.append)
    assert "wds_root not found" in bad["suite/retrieval"]["error"]


def test_suite_average_is_datacomps_mean_over_all_tasks():
    suite = {"tasks": [{"key": "a"}, {"key": "b"}, {"key": "c"}], "groups": {"ab": ["a", "b"], "bc": ["b", "c"]}}
    tasks = {"a": {"main": {"x": 0.2, "y": 0.4}}, "b": {"main": {"x": 0.6, "y": 0.1}}, "c": {"main": {"x": 0.1}}}
    avg = suite_averages(suite, tasks)
    assert avg["x"]["average"] == pytest.approx(0.3) and avg["x"]["average_present"] == pytest.approx(0.3)
    assert avg["x"]["groups"] == {"ab": pytest.approx(0.4), "bc": pytest.approx(0.35)}
    assert avg["y"]["average"] is None and avg["y"]["average_present"] == pytest.approx(0.25)
    assert avg["y"]["groups"] == {"ab": pytest.approx(0.25), "bc": None} and avg["y"]["num_present"] == 2
    # the printed table: a column per embedding (full names), averages as rows, n/a where open
    res = {"suite": "toy", "wds_root": "/r", "num_tasks": 3, "missing": [], "failed": [], "unsupported": [],
           "tasks": {k: {"name": k.upper(), "task": "zeroshot_classification", "main_metric": "acc1",
                         "status": "ok", **t} for k, t in tasks.items()}, "averages": avg}
    table = format_suite(res)
    assert re.search(r"average over all 3 tasks \(DataComp\) +30\.0 +n/a", table)
    assert re.search(r"average over the 3 tasks present +30\.0 +25\.0", table)
    assert re.search(r"group ab +40\.0 +25\.0", table) and re.search(r"\n  c +C +acc1 +10\.0 +n/a", table)
    long = {"ensemble_w0.1": avg["x"], "ensemble_w0.2": avg["y"]}
    assert "ensemble_w0.1 ensemble_w0.2" in format_suite({**res, "averages": long})


def test_imagenet_uses_open_clip_class_names_and_templates(tmp_path):
    import open_clip.zero_shot_metadata as meta

    suite = load_suite("datacomp38")
    task = next(t for t in suite["tasks"] if t["key"] == "imagenet1k")
    root = tmp_path / "wds"
    folder = root / "wds_imagenet1k"
    write_classification_wds(folder, classes=[f"class {i}" for i in range(1000)], counts=[1], templates=["{c}"])
    assert find_task_folder(str(root), task) == f"{root}/wds_imagenet1k"
    ds = suite_task_dataset(find_task_folder(str(root), task), task)
    classnames, templates = open_clip_imagenet()
    assert ds.classnames == list(meta.IMAGENET_CLASSNAMES) == classnames and len(classnames) == 1000
    assert ds.templates == templates and len(templates) == 80
    assert templates[0] == meta.OPENAI_IMAGENET_TEMPLATES[0]("{c}") == "a bad photo of a {c}."
    # a folder whose classes are not ImageNet's 1000 is refused, not silently mislabelled
    small = tmp_path / "small" / "wds_imagenet1k_test"  # DataComp's folder name
    write_classification_wds(small, classes=["a", "b"], counts=[1, 1])
    with pytest.raises(EvalDataError, match="1000"):
        suite_task_dataset(find_task_folder(str(tmp_path / "small"), task), task)
