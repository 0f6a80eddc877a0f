import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from plca.data.labels import CITYSCAPES_ID_TO_TRAINID, CLASS_NAMES, PROTOCOLS, TRAINID_TO_ID
from plca.score import main, score

H, W = 8, 16
# Label ids (not train ids) used to build cases by hand.
UNLABELED, EGO_VEHICLE, STATIC = 0, 1, 4
ROAD, SIDEWALK, WALL, TERRAIN, CAR = 7, 8, 12, 22, 26
LABEL_IDS = np.arange(34)
FRAMES = [("aachen", 0), ("aachen", 1), ("bochum", 7)]


def write_png(path: Path, ids: np.ndarray, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        img = Image.fromarray(ids.astype(np.uint16))
    else:
        img = _palette_image(ids) if mode == "P" else Image.fromarray(ids.astype(np.uint8)).convert(mode)
    img.save(path)
    assert img.mode == mode
    return path


def _palette_image(ids: np.ndarray) -> Image.Image:
    ids = np.ascontiguousarray(ids, dtype=np.uint8)
    img = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
    img.putpalette(np.random.default_rng(0).integers(0, 256, 768).astype(np.uint8).tobytes())
    return img


def gt_path(root: Path, city: str, frame: int) -> Path:
    return root / "gtFine" / "val" / city / f"{city}_000000_{frame:06d}_gtFine_labelIds.png"


def pred_name(city: str, frame: int) -> str:
    return f"{city}_000000_{frame:06d}_leftImg8bit.png"


@pytest.fixture()
def fixture_set(tmp_path):
    """3 tiny gtFine images (ignore regions, every class id) and predictions with ids outside the 19,
    some in a flat folder and some in city subfolders."""
    rng = np.random.default_rng(0)
    gt_dir, pred_dir = tmp_path / "gtFine" / "val", tmp_path / "pred"
    for i, (city, frame) in enumerate(FRAMES):
        gt = rng.choice(TRAINID_TO_ID, size=(H, W))
        gt[0, :] = UNLABELED  # ignore regions
        gt[1, :4] = rng.choice(LABEL_IDS, size=4)  # some non-evaluated label ids too
        gt[2, :] = ROAD
        pred = np.where(rng.random((H, W)) < 0.5, gt, rng.choice(LABEL_IDS, size=(H, W)))
        pred[2, :3] = [UNLABELED, EGO_VEHICLE, STATIC]  # predictions outside the evaluated set where gt is road
        pred[gt == UNLABELED] = CAR  # must be ignored
        write_png(gt_path(tmp_path, city, frame), gt)
        where = pred_dir / city if i % 2 else pred_dir
        write_png(where / pred_name(city, frame), pred, mode="P" if i == 2 else "L")  # palette PNGs are read as ids
    write_png(pred_dir / "unrelated_000000_000000_leftImg8bit.png", np.zeros((H, W)))  # matches no gt: ignored
    return pred_dir, gt_dir


def official_scores(pred_dir: Path, gt_dir: Path, tmp_path: Path) -> dict:
    """Run cityscapesscripts' evaluator, using its own prediction search."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs

    args = copy.copy(cs.args)
    args.predictionPath = str(pred_dir)
    args.predictionWalk = None
    args.evalInstLevelScore = False
    args.evalPixelAccuracy = False
    args.JSONOutput = False
    args.quiet = True
    args.exportFile = str(tmp_path / "official.json")
    gts = sorted(str(p) for p in gt_dir.glob("*/*_gtFine_labelIds.png"))
    preds = [cs.getPrediction(args, g) for g in gts]
    return cs.evaluateImgLists(preds, gts, args)


def test_agrees_with_official_evaluator(fixture_set, tmp_path):
    pred_dir, gt_dir = fixture_set
    ours, matrix = score(pred_dir, gt_dir, classes=19)
    official = official_scores(pred_dir, gt_dir, tmp_path)
    assert ours["images"] == 3
    assert matrix.counts[:, 19].sum() > 0  # the "other" column was exercised
    for name in CLASS_NAMES:
        theirs = official["classScores"][name]
        if np.isnan(theirs):
            assert ours["IoU"][name] is None
        else:
            assert ours["IoU"][name] / 100 == pytest.approx(theirs, abs=1e-9), name
    assert ours["mIoU"] / 100 == pytest.approx(official["averageScoreClasses"], abs=1e-9)


def test_hand_case_per_protocol_and_json(tmp_path):
    gt = np.full((1, 12), UNLABELED)
    pred = np.full((1, 12), CAR)
    gt[0, :11] = [ROAD] * 5 + [SIDEWALK] * 2 + [TERRAIN] * 2 + [WALL] * 2
    pred[0, :11] = [ROAD, ROAD, ROAD, TERRAIN, EGO_VEHICLE, SIDEWALK, ROAD, ROAD, ROAD, WALL, SIDEWALK]
    write_png(gt_path(tmp_path, "ulm", 3), gt)
    write_png(tmp_path / "pred" / pred_name("ulm", 3), pred)
    gt_dir, pred_dir = tmp_path / "gtFine" / "val", tmp_path / "pred"
    # road: tp 3, fn 2 (terrain, ego vehicle), fp 1 on sidewalk + 2 on terrain (the latter not in 16/13);
    # sidewalk: tp 1, fn 1, fp 1 on wall (not in 13); wall: tp 1, fn 1; terrain: tp 0, fn 2, fp 1.
    expected = {
        19: {"road": 3 / 8, "sidewalk": 1 / 3, "wall": 1 / 2, "terrain": 0.0},
        16: {"road": 3 / 6, "sidewalk": 1 / 3, "wall": 1 / 2},
        13: {"road": 3 / 6, "sidewalk": 1 / 2},
    }
    for protocol, ious in expected.items():
        out = tmp_path / f"score{protocol}.json"
        assert main([str(pred_dir), str(gt_dir), "--classes", str(protocol), "--json", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["classes"] == protocol and result["images"] == 1
        assert list(result["IoU"]) == [CLASS_NAMES[c] for c in PROTOCOLS[protocol]]
        for name, value in result["IoU"].items():
            if name in ious:
                assert value == pytest.approx(100 * ious[name]), (protocol, name)
            else:
                assert value is None, (protocol, name)
        assert result["mIoU"] == pytest.approx(100 * np.mean(list(ious.values())))
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["score13.json", "score16.json", "score19.json"]


def test_cli_prints_table(fixture_set, capsys):
    pred_dir, gt_dir = fixture_set
    assert main([str(pred_dir), str(gt_dir)]) == 0
    out = capsys.readouterr().out
    ours, _ = score(pred_dir, gt_dir)
    assert f"{ours['IoU']['road']:.2f}" in out
    assert out.splitlines()[-2].split() == ["mIoU", f"{ours['mIoU']:.2f}"]
    assert all(name in out for name in CLASS_NAMES)


def _break(kind: str, pred_dir: Path, gt_dir: Path) -> str:
    """Damage a valid fixture set in one way; return the text the error must name."""
    target = pred_dir / pred_name("aachen", 0)
    if kind == "missing":
        target.unlink()
        return "aachen_000000_000000_gtFine_labelIds.png"
    if kind == "duplicate":
        write_png(pred_dir / "sub" / "aachen_000000_000000_other.png", np.zeros((H, W)))
        return "aachen_000000_000000_other.png"
    if kind == "size":
        write_png(target, np.zeros((H, W + 1)))
        return str(target)
    if kind == "corrupt":
        target.write_bytes(target.read_bytes()[:30])
        return str(target)
    if kind == "not_png":
        target.write_text("hello")
        return str(target)
    if kind == "bad_id":
        ids = np.full((H, W), ROAD)
        ids[0, 0] = 34
        write_png(target, ids)
        return str(target)
    if kind == "bad_id_16bit":
        write_png(target, np.full((H, W), 65535), mode="I;16")
        return str(target)
    if kind == "ignore_255":
        write_png(target, np.full((H, W), 255))
        return str(target)
    if kind == "rgb":
        write_png(target, np.zeros((H, W)), mode="RGB")
        return str(target)
    if kind == "bad_gt_id":
        gt = gt_path(gt_dir.parent.parent, "bochum", 7)
        write_png(gt, np.full((H, W), 200))
        return str(gt)
    if kind == "no_gt_dir":
        return str(gt_dir / "nope")
    if kind == "no_pred_dir":
        return str(pred_dir / "nope")
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, words",
    [
        ("missing", "no prediction"),
        ("duplicate", "several predictions"),
        ("size", "differs"),
        ("corrupt", "corrupt"),
        ("not_png", "corrupt"),
        ("bad_id", "[34]"),
        ("bad_id_16bit", "[65535]"),
        ("ignore_255", "[255]"),
        ("rgb", "single-channel"),
        ("bad_gt_id", "[200]"),
        ("no_gt_dir", "not found"),
        ("no_pred_dir", "not found"),
    ],
)
def test_bad_input_exits_2_naming_the_file(fixture_set, capsys, kind, words):
    pred_dir, gt_dir = fixture_set
    named = _break(kind, pred_dir, gt_dir)
    if kind == "no_gt_dir":
        gt_dir = Path(named)
    if kind == "no_pred_dir":
        pred_dir = Path(named)
    out_json = pred_dir.parent / "out.json"
    assert main([str(pred_dir), str(gt_dir), "--json", str(out_json)]) == 2
    captured = capsys.readouterr()
    assert named in captured.err and words in captured.err
    assert captured.out == ""
    assert not out_json.exists()


def test_empty_gt_dir_and_unwritable_json(fixture_set, tmp_path, capsys):
    pred_dir, _ = fixture_set
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(pred_dir), str(empty)]) == 2
    assert "no <city>/*_gtFine_labelIds.png" in capsys.readouterr().err
    missing_folder = tmp_path / "no" / "such" / "out.json"
    assert main([str(pred_dir), str(tmp_path / "gtFine" / "val"), "--json", str(missing_folder)]) == 2
    assert str(missing_folder) in capsys.readouterr().err


def test_module_entry_point_without_traceback(fixture_set, tmp_path):
    pred_dir, gt_dir = fixture_set
    (pred_dir / pred_name("aachen", 0)).unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "plca.score", str(pred_dir), str(gt_dir)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "no prediction" in proc.stderr


def test_train_id_predictions_exit_2_instead_of_a_near_zero_miou(fixture_set, capsys):
    """The pipeline's train-id PNGs (0..18) scored as label ids: the scorer names the folder and says why."""
    pred_dir, gt_dir = fixture_set
    rng = np.random.default_rng(1)
    for city, frame in FRAMES:
        gt = np.array(Image.open(gt_path(gt_dir.parent.parent, city, frame)))
        train = CITYSCAPES_ID_TO_TRAINID[gt]  # a perfect prediction, written in train ids
        train[train == 255] = rng.integers(0, 19, int((train == 255).sum()))
        for old in pred_dir.rglob(f"{city}_000000_{frame:06d}*.png"):
            old.unlink()
        write_png(pred_dir / pred_name(city, frame), train)
    assert main([str(pred_dir), str(gt_dir)]) == 2
    err = capsys.readouterr().err
    assert "look like train ids (0..18), not Cityscapes label ids" in err and str(pred_dir) in err
    # the same predictions in label ids score (and the perfect one scores 100 on every class it has)
    for city, frame in FRAMES:
        path = pred_dir / pred_name(city, frame)
        write_png(path, TRAINID_TO_ID[np.array(Image.open(path))])
    result, _ = score(pred_dir, gt_dir)
    assert result["mIoU"] == pytest.approx(100.0)


def test_an_image_too_large_to_be_a_label_exits_2_naming_it(fixture_set, capsys, monkeypatch):
    pred_dir, gt_dir = fixture_set
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", H * W // 4)  # PIL refuses beyond twice this: our H x W files
    assert main([str(pred_dir), str(gt_dir)]) == 2
    err = capsys.readouterr().err
    assert "too large to be a label image" in err and "_gtFine_labelIds.png" in err


def test_a_prediction_whose_name_is_not_utf8_is_scored_and_named_printably(fixture_set, capsys):
    """A file name that is not UTF-8 is read like any other; an error names it in a form that prints (the byte
    0xff as the text \\xff), not with the lone surrogate that a strict UTF-8 stream or log file refuses."""
    pred_dir, gt_dir = fixture_set
    before, _ = score(pred_dir, gt_dir)
    bad = os.fsencode(pred_dir) + b"/aachen_000000_000000_bad\xff.png"
    os.rename(os.fsencode(pred_dir / pred_name("aachen", 0)), bad)
    after, _ = score(pred_dir, gt_dir)
    assert after == before
    with open(bad, "rb") as f:
        head = f.read(30)
    with open(bad, "wb") as f:
        f.write(head)
    assert main([str(pred_dir), str(gt_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{pred_dir}/aachen_000000_000000_bad\\xff.png: unreadable or corrupt PNG" in err
    err.encode("utf-8")

