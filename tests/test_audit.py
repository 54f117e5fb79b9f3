"""The data audit: confident learning against a hand computation; the stage on real HDF5 split files of synthetic
features with planted label flips, a planted near-copy of a test image in train and a planted outlier; and
data.exclude / data.relabel through prepare and extract on real images (nothing recomputed)."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages import audit as audit_stage
from stages import extract, prepare
from tests.conftest import merged
from tests.dvc_repo import DvcRepo
from tests.test_pipeline_dvc import baseline  # noqa: F401  (the fixture: the pipeline run once, committed)
from transfer_learning.audit.confident_learning import (calibrated, confident_joint, find_label_issues,
                                                        prune_by_noise_rate, thresholds)
from transfer_learning.common.errors import UserError
from transfer_learning.data import manifest
from transfer_learning.features.split_files import SplitRows, write_split
from transfer_learning.features.store import store_key
from transfer_learning.params import load_params


def read_csv(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def set_params(**sections) -> None:
    path = Path("params.yaml")
    path.write_text(yaml.safe_dump(merged(yaml.safe_load(path.read_text()), sections), sort_keys=False))


# ---- confident learning, by hand ---------------------------------------------------------------------------------

def test_confident_learning_follows_the_paper_on_a_hand_computed_example():
    # 2 classes; images 0-3 labelled 0, 4-6 labelled 1
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8], [0.1, 0.9], [0.4, 0.6], [0.7, 0.3]])
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    t = thresholds(p, y)
    np.testing.assert_allclose(t, [(0.9 + 0.8 + 0.3 + 0.2) / 4, (0.9 + 0.6 + 0.3) / 3])  # 0.55, 0.6
    # image 0: p0 0.9 >= 0.55 only -> (0, 0); 1 -> (0, 0); 2: p1 0.7 >= 0.6 -> (0, 1); 3 -> (0, 1);
    # 4 -> (1, 1); 5: p1 0.6 >= 0.6 -> (1, 1); 6: p0 0.7 >= 0.55 -> (1, 0)
    joint = confident_joint(p, y, t)
    np.testing.assert_array_equal(joint, [[2, 2], [1, 2]])
    # rows rescaled to the label counts (4 and 3): [[2, 2], [1, 2]]; sum 7
    q = calibrated(joint, y)
    np.testing.assert_allclose(q, np.array([[2, 2], [1, 2]]) / 7)
    # a row that counted fewer images than carry its label is scaled up to them: 8 labelled 0, 3 labelled 1
    np.testing.assert_allclose(calibrated(joint, np.array([0] * 8 + [1] * 3)), np.array([[4, 4], [1, 2]]) / 11)
    # prune by noise rate: round(7 * 2/7) = 2 images labelled 0 with the largest p1 - p0 (3 and 2), 1 labelled 1
    # with the largest p0 - p1 (6)
    flagged, pair = prune_by_noise_rate(p, y, q)
    assert np.flatnonzero(flagged).tolist() == [2, 3, 6] and pair[[2, 3, 6]].tolist() == [1, 1, 0]
    issues = find_label_issues(p, y, "self_confidence")
    assert issues.flagged.tolist() == [3, 2, 6]  # p_given 0.2, 0.3, 0.3: lowest first, ties in index order
    assert issues.suggested[[2, 3, 6]].tolist() == [1, 1, 0]
    assert find_label_issues(p, y, "normalized_margin").flagged.tolist() == [3, 2, 6]  # -0.6, -0.4, -0.4


def test_with_no_confident_disagreement_nothing_is_flagged():
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.1, 0.9]])
    assert find_label_issues(p, np.array([0, 0, 1, 1]), "self_confidence").flagged.size == 0


# ---- the stage on synthetic features in real split files --------------------------------------------------------

CLASSES = [f"c{i}" for i in range(6)]
PER_CLASS = {"train": 40, "val": 10, "test": 10}
FLIPS = 8


def planted_project(root: Path) -> dict:
    """Real split files and manifest of clustered features: FLIPS train labels flipped, a test image's near-copy
    in train, one train image far from every class. Returns what was planted."""
    rng = np.random.default_rng(0)
    dim = 32
    centres = rng.normal(0, 1, (len(CLASSES), dim)) * 3
    rows, planted = [], {}
    for split, n in PER_CLASS.items():
        for label in range(len(CLASSES)):
            for _ in range(n):
                # some images typical of their class, some far out: self-confidence spreads as in real data
                rows.append([split, label, centres[label] + rng.normal(0, 1, dim) * rng.uniform(0.3, 2.0)])
    train = [i for i, r in enumerate(rows) if r[0] == "train"]
    flipped = rng.choice(train, FLIPS, replace=False)
    planted["flips"] = {}
    for i in flipped:
        true = rows[i][1]
        rows[i][1] = int((true + rng.integers(1, len(CLASSES))) % len(CLASSES))
        planted["flips"][int(i)] = true
    original = next(i for i, r in enumerate(rows) if r[0] == "test")
    rows.append(["train", rows[original][1], rows[original][2] + rng.normal(0, 0.01, dim)])
    planted["copy"] = (len(rows) - 1, original)
    rows.append(["train", 0, rng.normal(0, 1, dim) * 3 + 40 * np.eye(dim)[0]])
    planted["outlier"] = len(rows) - 1

    paths = [f"images/{CLASSES[r[1]]}/{i}.png" for i, r in enumerate(rows)]
    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(len(rows))]
    manifest_rows = [manifest.Row(p, CLASSES[r[1]], r[0], d) for p, r, d in zip(paths, rows, digests)]
    manifest.write(manifest_rows, CLASSES, [], "auto")
    for split in manifest.SPLITS:
        members = [i for i, r in enumerate(rows) if r[0] == split]
        write_split(root / "data/features" / f"{split}.h5",
                    SplitRows([store_key(digests[i], "0") for i in members], [paths[i] for i in members],
                              [rows[i][1] for i in members], [0] * len(members)),
                    iter([np.array([rows[i][2] for i in members], np.float32)]), fingerprint="0" * 64,
                    classes=CLASSES, feature_dim=dim, dtype="float32")
    planted["paths"] = paths
    return planted


def test_the_audit_finds_planted_flips_a_leak_and_an_outlier_in_real_split_files(project, caplog):
    caplog.set_level("INFO", logger="audit")
    planted = planted_project(project.root)
    # 50 train+val images per class: fewer neighbours than the default 40, and a less regularized head, so that a
    # clean image's out-of-fold probability stands clear of a flipped one's
    project.params(audit={"neighbors": 10, "C": 1.0})
    audit_stage.main()
    metrics = json.loads(Path("metrics/audit.json").read_text())
    paths = planted["paths"]

    issues = read_csv("reports/audit/label_issues.csv")
    by_path = {r["path"]: r for r in issues}
    found = [i for i in planted["flips"] if paths[i] in by_path]
    assert len(found) >= FLIPS - 1, f"{len(found)} of {FLIPS} planted flips found"
    assert all(by_path[paths[i]]["suggested_label"] == CLASSES[planted["flips"][i]] for i in found)
    assert len(issues) <= 2 * FLIPS and metrics["label_issues"] == len(issues)
    assert [int(r["rank"]) for r in issues] == list(range(1, len(issues) + 1))
    assert {r["split"] for r in issues} <= {"train", "val"}  # test is never audited for labels

    copies = read_csv("reports/audit/near_duplicates.csv")
    copy, original = planted["copy"]
    # the planted pair is the most certain one, its train member the one to drop, and the only leak
    assert [(r["path"], r["split"], r["duplicate_of"], r["duplicate_of_split"]) for r in copies][0] == \
        (paths[copy], "train", paths[original], "test")
    assert len(copies) <= 3 and [r["duplicate_of_split"] for r in copies].count("test") == 1
    assert (metrics["test_with_train_copy"], metrics["val_with_train_copy"]) == (1, 0)

    outlying = read_csv("reports/audit/outliers.csv")
    assert outlying and outlying[0]["path"] == paths[planted["outlier"]]

    plotted = read_csv("plots/audit/map.csv")
    assert len(plotted) == len(paths) and {"x", "y", "label", "split", "flag"} <= set(plotted[0])
    assert next(r for r in plotted if r["path"] == paths[planted["outlier"]])["flag"].startswith("outlier") or \
        "outlier" in next(r for r in plotted if r["path"] == paths[planted["outlier"]])["flag"]
    for sheet in ("label_issues", "near_duplicates", "outliers", "map"):
        assert Path(f"reports/audit/{sheet}.png").stat().st_size > 1000
    report = Path("reports/audit.md").read_text()
    assert f"**{len(issues)} likely label issues**" in report and "1 test and 0 val images have a near-copy" in report
    assert "data.exclude" in report
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "audit"]
    assert ("WARNING", "1 test and 0 val images have a near-copy in train: their accuracies are optimistic "
            "(reports/audit/near_duplicates.csv; data.exclude leaves such images out)") in logged
    assert any(m.startswith(f"{len(paths)} images from their cached features") for _, m in logged)
    timings = json.loads(Path("reports/timings/audit.json").read_text())
    assert "seconds" in timings and "seconds" not in metrics


def test_the_audit_disabled_writes_a_skip_record(project):
    project.params(audit={"enabled": False})
    audit_stage.main()
    assert json.loads(Path("metrics/audit.json").read_text()) == {"enabled": False}
    assert "Disabled" in Path("reports/audit.md").read_text()
    assert not list(Path("plots/audit").glob("*.csv"))


# ---- data.exclude / data.relabel ---------------------------------------------------------------------------------

def test_lists_outside_the_curation_folder_not_csv_or_the_audits_own_outputs_are_refused(project):
    Path("reports/audit").mkdir(parents=True)
    Path("reports/audit/label_issues.csv").write_text("path\n")
    Path("data/curation").mkdir(parents=True)
    Path("data/curation/notes.txt").write_text("")
    Path("exclude.csv").write_text("path\n")
    for name, message in (("data/curation/missing.csv", "does not exist"),
                          ("data/curation/notes.txt", "is not a CSV file"),
                          ("exclude.csv", "is not in data/curation/, the folder prepare depends on in dvc.yaml"),
                          ("reports/audit/label_issues.csv", "copy it into data/curation/")):
        project.params(data={"exclude": [name]})
        with pytest.raises(UserError, match=rf"data.exclude.*{message}"):
            load_params()
    project.params(data={"relabel": "reports/audit/label_issues.csv"})  # one file without a list, too
    with pytest.raises(UserError, match="data.relabel"):
        load_params()


@pytest.mark.slow
def test_an_edited_list_re_runs_prepare_under_dvc(baseline, tmp_path):
    repo = DvcRepo.copy_of(baseline, tmp_path / "repo")  # run with data.exclude: [data/curation/exclude.csv], empty
    tmp_path = repo.root
    lists = tmp_path / "data" / "curation"
    assert (lists / "exclude.csv").read_text() == "sha256\n"
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["data"]["exclude"] == ["data/curation/exclude.csv"]
    kept = (tmp_path / "data/prepared/manifest.csv").read_text().splitlines()[1:]
    # nothing is stale on a copy of the baseline (tests/test_pipeline_dvc.py): the status below names the list
    first = next(csv.DictReader((tmp_path / "data/prepared/manifest.csv").open()))
    (lists / "exclude.csv").write_text(f"sha256\n{first['sha256']}\n")  # the list edited, params.yaml not
    assert "data/curation" in repo.dvc("status", "prepare")
    repo.dvc("repro", "prepare")
    after = (tmp_path / "data/prepared/manifest.csv").read_text().splitlines()[1:]
    assert len(after) == len(kept) - 1 and first["sha256"] not in "".join(after)


def test_excluding_and_relabelling_keeps_every_split_and_computes_no_feature(workdir):
    extract.main()
    before = {row.path: row for row in manifest.read()}
    rows = list(before.values())
    by_path, by_sha = rows[0], rows[1]
    relabelled = next(r for r in rows[2:] if r.label != "3")
    lists = Path("data/curation")
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "exclude.csv").write_text(f"path,split\n{by_path.path},{by_path.split}\n")
    (lists / "more.csv").write_text(f"sha256\n{by_sha.sha256}\n{'0' * 64}\n")  # the second matches no image
    (lists / "relabel.csv").write_text(f"rank,path,given_label,suggested_label\n1,{relabelled.path},"
                                       f"{relabelled.label},3\n")
    set_params(data={"exclude": ["data/curation/exclude.csv", "data/curation/more.csv"],
                     "relabel": ["data/curation/relabel.csv"]})
    prepare.main()
    after = {row.path: row for row in manifest.read()}
    assert set(before) - set(after) == {by_path.path, by_sha.path}
    assert after[relabelled.path].label == "3"
    assert all(after[p].split == before[p].split for p in after)  # excluding moved no image to another split
    rejected = read_csv("data/prepared/rejected.csv")
    assert sorted((r["path"], r["kind"]) for r in rejected) == sorted(
        [(by_path.path, "excluded"), (by_sha.path, "excluded")])
    prepared = json.loads(Path("metrics/prepare.json").read_text())
    assert (prepared["excluded"], prepared["relabelled"], prepared["curation_unmatched"]) == (2, 1, 1)

    extract.main()
    extracted = json.loads(Path("metrics/extract.json").read_text())
    assert (extracted["images"], extracted["computed"]) == (len(before) - 2, 0)

    (lists / "relabel.csv").write_text(f"path,label\n{relabelled.path},no-such-class\n")
    with pytest.raises(UserError, match=r"relabel.csv:2: 'no-such-class' is not a class; valid: 0, 1"):
        prepare.main()

    audit_stage.main()  # a small real end-to-end run: 56 digits, too few per class for 5 folds
    metrics = json.loads(Path("metrics/audit.json").read_text())
    assert metrics["images"] == len(before) - 2 and metrics["folds"] < 5


def test_the_plotted_map_keeps_every_flagged_image_and_a_seeded_sample_past_its_size(monkeypatch):
    from transfer_learning.audit import report

    flags = ["none"] * 50 + ["outlier", "near_copy+label_issue"] + ["none"] * 48
    assert report.plotted(flags, 0).tolist() == list(range(100))
    monkeypatch.setattr(report, "MAP_POINTS_MAX", 10)
    shown = report.plotted(flags, 0)
    assert len(shown) == 10 and {50, 51} <= set(shown.tolist()) and shown.tolist() == sorted(shown.tolist())
    assert report.plotted(flags, 0).tolist() == shown.tolist()  # seeded


def test_the_neighbour_search_is_exact_and_its_two_top_k_paths_agree():
    from transfer_learning.audit.neighbours import nearest, unit_rows

    rng = np.random.default_rng(0)
    rows = unit_rows(rng.normal(size=(1500, 16)).astype(np.float32))  # more than one block of queries
    labelled = rng.random(1500) < 0.7
    similarity = rows @ rows.T
    np.fill_diagonal(similarity, -np.inf)
    expected_all = np.argsort(-similarity, axis=1, kind="stable")[:, :11]
    expected_labelled = np.argsort(-np.where(labelled, similarity, -np.inf), axis=1, kind="stable")[:, :40]
    for fast in (False, True):
        (labelled_index, labelled_values), (all_index, all_values) = nearest(
            rows, rows, np.arange(1500), [(40, labelled), (11, None)], fast_top_k=fast)
        assert (all_index == expected_all).mean() > 0.999 and (labelled_index == expected_labelled).mean() > 0.999
        assert labelled[labelled_index].all() and not (all_index == np.arange(1500)[:, None]).any()
        np.testing.assert_allclose(all_values, np.take_along_axis(similarity, all_index, axis=1), rtol=1e-6)
