"""Pre-resizing: sizes, nearest labels in their original formats, GTA5 mismatches, workers, atomic output."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from real_formats import cityscapes_id_palette, write_cityscapes, write_gta5, write_palette_png, write_synthia

from plca.data.extract import COMPLETE_MARKER
from plca.data.resize import ResizeConfig, ResizeError, resize_dataset, target_size
from plca.data.verify import VerifyConfig, verify_dataset

INLINE = ResizeConfig(short_edge=6, workers=1, progress=False)


def test_target_size_keeps_aspect_and_does_not_upscale() -> None:
    assert target_size(1914, 1052, 988) == (1798, 988)  # GTA5
    assert target_size(2048, 1024, 730) == (1460, 730)  # Cityscapes at the paper's test scale
    assert target_size(1280, 760, 988) == (1280, 760)  # SYNTHIA is already smaller: left alone
    assert target_size(1280, 760, 988, upscale=True) == (1664, 988)


def test_gta5_is_halved_with_nearest_palette_labels(tmp_path: Path) -> None:
    ids = write_gta5(tmp_path / "raw/gta5", 3, size=(12, 20))
    report = resize_dataset(tmp_path / "raw/gta5", tmp_path / "small/gta5", "gta5", INLINE)
    assert report.pairs == 3 and report.label_size_fixed == []
    out = tmp_path / "small/gta5"
    for name, original in ids.items():
        image = cv2.imread(str(out / "images" / f"{name}.png"))
        assert image.shape == (6, 10, 3)
        with Image.open(out / "labels" / f"{name}.png") as lab:
            assert lab.mode == "P"  # still a palette PNG the GTA5 reader understands
            assert lab.getpalette()[: 3 * 34] == cityscapes_id_palette()[:34].ravel().tolist()
            # nearest-neighbour at an exact factor 2 keeps every other pixel: no blended ids
            np.testing.assert_array_equal(np.asarray(lab), original[::2, ::2])
    assert verify_dataset(out, "gta5", {"all": 3}, VerifyConfig(workers=1)).ok
    assert json.loads((out / COMPLETE_MARKER).read_text())["pairs"] == 3


def test_area_interpolation_averages_image_pixels(tmp_path: Path) -> None:
    write_gta5(tmp_path / "g", 1, size=(12, 20))
    img = np.zeros((12, 20, 3), np.uint8)
    img[:, ::2] = 200  # alternate columns 0 / 200: area averaging gives 100 everywhere
    cv2.imwrite(str(tmp_path / "g/images/00001.png"), img)
    resize_dataset(tmp_path / "g", tmp_path / "o", "gta5", INLINE)
    assert np.all(cv2.imread(str(tmp_path / "o/images/00001.png")) == 100)


def test_synthia_16bit_labels_keep_their_format(tmp_path: Path) -> None:
    ids = write_synthia(tmp_path / "s", 2, size=(12, 20))
    resize_dataset(tmp_path / "s", tmp_path / "o", "synthia", INLINE)
    gt = cv2.imread(str(tmp_path / "o/GT/LABELS/0000001.png"), cv2.IMREAD_UNCHANGED)
    assert gt.dtype == np.uint16 and gt.shape == (6, 10, 3)
    np.testing.assert_array_equal(gt[..., 2], ids["0000001"][::2, ::2])  # class id, first RGB channel
    assert verify_dataset(tmp_path / "o", "synthia", {"all": 2}, VerifyConfig(workers=1)).ok


def test_gta5_label_of_another_size_is_brought_to_the_image_size(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    write_gta5(tmp_path / "g", 2, size=(12, 20))
    write_palette_png(tmp_path / "g/labels/00002.png", np.full((24, 40), 26, np.uint8), cityscapes_id_palette())
    with caplog.at_level(logging.WARNING):
        report = resize_dataset(tmp_path / "g", tmp_path / "o", "gta5", INLINE)
    assert report.label_size_fixed == ["00002"]
    assert "1 labels differed in size from their images" in caplog.text and "00002" in caplog.text
    with Image.open(tmp_path / "o/labels/00002.png") as lab:
        assert lab.size == (10, 6) and set(np.unique(np.asarray(lab))) == {26}
    r = verify_dataset(tmp_path / "o", "gta5", {"all": 2}, VerifyConfig(workers=1))
    assert r.ok and r.size_mismatches == {}


def test_cityscapes_chosen_splits_with_worker_processes(tmp_path: Path) -> None:
    write_cityscapes(tmp_path / "cs", {"train": 3, "val": 2, "test": 1}, size=(16, 32))
    cfg = ResizeConfig(short_edge=8, workers=2, progress=False)
    report = resize_dataset(tmp_path / "cs", tmp_path / "o", "cityscapes", cfg, splits=["train", "val"])
    assert report.pairs == 5 and not (tmp_path / "o/leftImg8bit/test").exists()
    r = verify_dataset(tmp_path / "o", "cityscapes", {"train": 3, "val": 2}, VerifyConfig(workers=1))
    assert r.ok
    lab = next((tmp_path / "o/gtFine/train").rglob("*_labelIds.png"))
    assert cv2.imread(str(lab), cv2.IMREAD_UNCHANGED).shape == (8, 16)


def test_failure_leaves_no_output_and_keeps_the_previous_one(tmp_path: Path) -> None:
    write_gta5(tmp_path / "g", 3)
    resize_dataset(tmp_path / "g", tmp_path / "o", "gta5", INLINE)
    (tmp_path / "g/images/00003.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ResizeError, match=r"00003.png: cannot decode image PNG"):
        resize_dataset(tmp_path / "g", tmp_path / "o", "gta5", INLINE)
    assert sorted(p.name for p in (tmp_path / "o/images").iterdir()) == ["00001.png", "00002.png", "00003.png"]
    assert not (tmp_path / ".o.resizing").exists()
    (tmp_path / "g/labels/00001.png").unlink()
    with pytest.raises(ResizeError, match=r"00001.png: no matching label"):
        resize_dataset(tmp_path / "g", tmp_path / "p", "gta5", INLINE)
    assert not (tmp_path / "p").exists()


def files_under(root: bytes) -> dict[bytes, bytes]:
    """{path relative to root: content} of every file under root (paths as raw bytes)."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_names_that_are_not_utf8_are_read_and_written_with_the_same_bytes(tmp_path: Path) -> None:
    """cv2.imread and cv2.imwrite segfault on a file name that is not UTF-8 (run in a subprocess, so that the fault
    fails this test rather than ending the session). Each layout is resized twice, from folders and files with
    plain names and from copies whose names are not UTF-8: every file written (images and GTA5's palette,
    Cityscapes' grey and SYNTHIA's 16-bit labels) has the same bytes, under the same name."""
    renamed = {"gta5": b"0000\xff", "synthia": b"000000\xfe", "cityscapes": b"aachen_bad\xff_000000_000019"}
    plain = {"gta5": "00001", "synthia": "0000001", "cityscapes": "aachen_000000_000019"}
    for folder in ("plain", "bad"):
        write_gta5(tmp_path / folder / "gta5", 2, size=(12, 20))
        write_synthia(tmp_path / folder / "synthia", 2, size=(12, 20))
        write_cityscapes(tmp_path / folder / "cityscapes", {"train": 2}, {"train": ("aachen",)}, size=(16, 32))
    bad_root = os.fsencode(tmp_path / "bad")
    for layout, name in plain.items():
        for path in (tmp_path / "bad" / layout).rglob(f"{name}*.png"):
            new = os.path.join(os.fsencode(path.parent), renamed[layout] + path.name[len(name):].encode())
            os.rename(os.fsencode(path), new)
        os.rename(os.path.join(bad_root, layout.encode()), os.path.join(bad_root, layout.encode() + b"\xff"))
    cfg = ResizeConfig(short_edge=6, workers=1, progress=False)
    for layout in plain:
        resize_dataset(tmp_path / "plain" / layout, tmp_path / "out" / layout, layout, cfg)  # type: ignore[arg-type]
    code = """
        import os, sys
        from plca.data.resize import ResizeConfig, resize_dataset
        src, dst = os.fsencode(sys.argv[1]), os.fsencode(sys.argv[2])
        for layout, workers in (("gta5", 1), ("synthia", 1), ("cityscapes", 2)):
            cfg = ResizeConfig(short_edge=6, workers=workers, progress=False)
            resize_dataset(os.fsdecode(src + b"/" + layout.encode() + b"\\xff"),
                           os.fsdecode(dst + b"/" + layout.encode()), layout, cfg)
    """
    out_bad = os.fsencode(tmp_path) + b"/out\xfe"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), os.fsdecode(bad_root), os.fsdecode(out_bad)],
                          capture_output=True, encoding="utf-8", errors="backslashreplace", timeout=300)
    assert proc.returncode == 0, f"resizing exited {proc.returncode} (-11: segfault):\n{proc.stderr}"
    for layout, name in plain.items():
        expected = files_under(os.fsencode(tmp_path / "out" / layout))
        got = files_under(out_bad + b"/" + layout.encode())
        assert json.loads(got.pop(COMPLETE_MARKER.encode()))["pairs"] == 2
        del expected[COMPLETE_MARKER.encode()]  # names its source folder
        assert len(expected) == 4
        assert got == {k.replace(name.encode(), renamed[layout]): v for k, v in expected.items()}

