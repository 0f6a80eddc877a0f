"""Verification of extracted datasets: pairs, counts, readable PNGs, label values, GTA5 size mismatches."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
from real_formats import (
    cityscapes_id_palette,
    truncate_file,
    write_cityscapes,
    write_gta5,
    write_palette_png,
    write_synthia,
)

from plca.data import verify
from plca.data.verify import DatasetError, VerifyConfig, list_pairs, png_header, verify_dataset

INLINE = VerifyConfig(workers=1)
#: Pairs on which `_dies_on_some_pairs` kills the worker process checking them.
DYING = ("00020", "00021")


def test_complete_fixtures_of_each_layout_pass(tmp_path: Path) -> None:
    write_gta5(tmp_path / "gta5", 3)
    write_synthia(tmp_path / "synthia", 2)
    write_cityscapes(tmp_path / "cs", {"train": 3, "val": 2, "test": 1})
    r = verify_dataset(tmp_path / "gta5", "gta5", {"all": 3}, INLINE).raise_if_failed()
    assert r.counts == {"all": 3} and not r.size_mismatches
    r = verify_dataset(tmp_path / "synthia", "synthia", {"all": 2}, INLINE).raise_if_failed()
    assert r.counts == {"all": 2}
    r = verify_dataset(tmp_path / "cs", "cityscapes", {"train": 3, "val": 2}, INLINE).raise_if_failed()
    assert r.counts == {"train": 3, "val": 2}  # only the splits asked for
    r = verify_dataset(tmp_path / "cs", "cityscapes", None, INLINE)
    assert r.ok and r.counts == {"test": 1, "train": 3, "val": 2}


def test_worker_processes_give_the_same_report(tmp_path: Path) -> None:
    write_gta5(tmp_path / "gta5", 4)
    (tmp_path / "gta5/labels/00003.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # header ok, data not
    serial = verify_dataset(tmp_path / "gta5", "gta5", {"all": 4}, INLINE)
    pooled = verify_dataset(tmp_path / "gta5", "gta5", {"all": 4}, VerifyConfig(workers=2))
    assert serial.errors == pooled.errors and len(serial.errors) == 1


def test_wrong_counts_and_wrong_layout_are_reported(tmp_path: Path) -> None:
    write_cityscapes(tmp_path / "cs", {"train": 2, "val": 1})
    r = verify_dataset(tmp_path / "cs", "cityscapes", {"train": 2975, "val": 500}, INLINE)
    assert f"{tmp_path / 'cs'}: split 'train' has 2 image/label pairs; expected 2975" in r.errors
    assert any("split 'val' has 1" in e for e in r.errors)
    with pytest.raises(DatasetError, match="expected 2975"):
        r.raise_if_failed()
    # GTA5 archives unpacked one level too deep: images/ and labels/ are not at the dataset root
    write_gta5(tmp_path / "nested/data", 2)
    r = verify_dataset(tmp_path / "nested", "gta5", {"all": 2}, INLINE)
    assert f"{tmp_path / 'nested/images'}: folder missing" in r.errors
    # a Cityscapes copy holding only leftImg8bit
    write_cityscapes(tmp_path / "half", {"train": 1})
    for p in sorted((tmp_path / "half/gtFine").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (tmp_path / "half/gtFine").rmdir()
    r = verify_dataset(tmp_path / "half", "cityscapes", {"train": 1}, INLINE)
    assert f"{tmp_path / 'half/gtFine/train'}: folder missing" in r.errors


def test_unpaired_files_are_named(tmp_path: Path) -> None:
    write_gta5(tmp_path / "g", 3)
    (tmp_path / "g/labels/00002.png").unlink()
    (tmp_path / "g/images/00003.png").rename(tmp_path / "g/images/00009.png")
    r = verify_dataset(tmp_path / "g", "gta5", {"all": 3}, INLINE)
    assert f"{tmp_path / 'g/images/00002.png'}: no matching label {tmp_path / 'g/labels/00002.png'}" in r.errors
    assert any(e.startswith(f"{tmp_path / 'g/labels/00003.png'}: no matching image") for e in r.errors)
    assert r.counts == {"all": 1}
    write_cityscapes(tmp_path / "cs", {"val": 2})
    img = next((tmp_path / "cs/leftImg8bit/val").rglob("*.png"))
    img.unlink()
    r = verify_dataset(tmp_path / "cs", "cityscapes", {"val": 2}, INLINE)
    assert any("_gtFine_labelIds.png: no matching image" in e for e in r.errors)


def test_unreadable_pngs_are_named(tmp_path: Path) -> None:
    write_synthia(tmp_path / "s", 3)
    (tmp_path / "s/RGB/0000001.png").write_bytes(b"GIF89a not a png at all")
    good = (tmp_path / "s/GT/LABELS/0000002.png").read_bytes()
    (tmp_path / "s/GT/LABELS/0000002.png").write_bytes(good[: len(good) // 2])  # truncated download
    r = verify_dataset(tmp_path / "s", "synthia", {"all": 3}, INLINE)
    assert f"{tmp_path / 's/RGB/0000001.png'}: not a PNG file (bad signature or header)" in r.errors
    assert f"{tmp_path / 's/GT/LABELS/0000002.png'}: cannot decode label PNG" in r.errors
    # headers only: the truncated file passes (its header is intact), the non-PNG does not
    fast = verify_dataset(tmp_path / "s", "synthia", {"all": 3}, VerifyConfig(workers=1, check_pixels=False))
    assert len(fast.errors) == 1 and "0000001.png" in fast.errors[0]


def test_label_values_outside_the_table_are_named(tmp_path: Path) -> None:
    write_cityscapes(tmp_path / "cs", {"train": 2})
    lab = sorted((tmp_path / "cs/gtFine/train").rglob("*_labelIds.png"))[0]
    ids = cv2.imread(str(lab), cv2.IMREAD_UNCHANGED)
    ids[0, :3] = (40, 41, 200)
    cv2.imwrite(str(lab), ids)
    r = verify_dataset(tmp_path / "cs", "cityscapes", {"train": 2}, INLINE)
    assert r.errors == [f"{lab}: label values [40, 41, 200] are outside the cityscapes class table"]
    # SYNTHIA: class id 23 in the first RGB channel is unknown; big values in the instance channel are fine
    write_synthia(tmp_path / "s", 1)
    p = tmp_path / "s/GT/LABELS/0000000.png"
    gt = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    gt[..., 1] = 60000  # cv2 order BGR: channel 1 is the instance (G) channel
    cv2.imwrite(str(p), gt)
    assert verify_dataset(tmp_path / "s", "synthia", {"all": 1}, INLINE).ok
    gt[0, 0, 2] = 23  # R = first RGB channel = class id
    cv2.imwrite(str(p), gt)
    r = verify_dataset(tmp_path / "s", "synthia", {"all": 1}, INLINE)
    assert r.errors == [f"{p}: label values [23] are outside the synthia class table"]


def test_gta5_label_in_colour_instead_of_palette_is_refused(tmp_path: Path) -> None:
    write_gta5(tmp_path / "g", 1)
    p = tmp_path / "g/labels/00001.png"
    cv2.imwrite(str(p), np.zeros((12, 20, 3), np.uint8))
    r = verify_dataset(tmp_path / "g", "gta5", {"all": 1}, INLINE)
    assert r.errors == [f"{p}: GTA5 label has mode RGB; expected a palette or grey PNG"]


def test_gta5_size_mismatches_are_reported_not_failed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_gta5(tmp_path / "g", 4, size=(12, 20))
    pal = cityscapes_id_palette()
    write_palette_png(tmp_path / "g/labels/00002.png", np.full((10, 18), 7, np.uint8), pal)
    write_palette_png(tmp_path / "g/labels/00004.png", np.full((12, 22), 7, np.uint8), pal)
    with caplog.at_level(logging.WARNING, logger="plca.data.verify"):
        r = verify_dataset(tmp_path / "g", "gta5", {"all": 4}, INLINE, known_mismatches=["00002", "15188"])
    assert r.ok
    assert r.size_mismatches == {"00002": ((20, 12), (18, 10)), "00004": ((20, 12), (22, 12))}
    assert r.known_mismatches == ["00002"]
    assert "2 image/label size mismatches (known: 00002; not listed as known: 00004)" in caplog.text


def test_size_mismatch_is_an_error_outside_gta5(tmp_path: Path) -> None:
    write_cityscapes(tmp_path / "cs", {"val": 1}, size=(16, 32))
    lab = next((tmp_path / "cs/gtFine/val").rglob("*_labelIds.png"))
    cv2.imwrite(str(lab), np.zeros((8, 16), np.uint8))
    r = verify_dataset(tmp_path / "cs", "cityscapes", {"val": 1}, INLINE)
    assert len(r.errors) == 1 and r.errors[0].startswith(f"{lab}: label is 16x8 but its image")


def test_missing_root_and_png_header(tmp_path: Path) -> None:
    r = verify_dataset(tmp_path / "nothing", "gta5", {"all": 1}, INLINE)
    assert r.errors == [f"{tmp_path / 'nothing'}: dataset folder missing"]
    write_synthia(tmp_path / "s", 1, size=(12, 20))
    assert png_header(tmp_path / "s/GT/LABELS/0000000.png") == (20, 12, 16, 2)  # 16-bit RGB
    pairs = list_pairs(tmp_path / "s", "synthia")
    assert [(p.split, p.name) for p in pairs] == [("all", "0000000")]
    with pytest.raises(ValueError, match="unknown dataset layout 'kitti'"):
        list_pairs(tmp_path / "s", "kitti")  # type: ignore[arg-type]


def rename(path: Path | str, new_name: bytes) -> str:
    """Rename a file or folder to a name of raw bytes; its new path as Python holds it (surrogate escapes)."""
    new = os.path.join(os.path.dirname(os.fsencode(path)), new_name)
    os.rename(os.fsencode(path), new)
    return os.fsdecode(new)


def cityscapes_not_utf8(tmp_path: Path) -> tuple[str, str]:
    """Cityscapes train frames under a folder whose name is not UTF-8 (written under a plain name, as OpenCV
    cannot write there), two frames also named so, the second with its image truncated (the PNG header intact).
    Returns the root and the error verification must report for the truncated image."""
    stems = sorted(write_cityscapes(tmp_path / "cs", {"train": 4}, cities={"train": ("aachen",)}, size=(8, 16)))
    folders = (tmp_path / "cs/leftImg8bit/train/aachen", tmp_path / "cs/gtFine/train/aachen")
    for stem, bad in zip(stems, (b"aachen_bad\xff", b"aachen_bad\xfe"), strict=False):  # aachen_000000_000019 ...
        for folder, suffix in zip(folders, ("_leftImg8bit.png", "_gtFine_labelIds.png"), strict=True):
            rename(folder / f"{stem}{suffix}", bad + f"{stem[len('aachen'):]}{suffix}".encode())
    broken = b"aachen_bad\xfe" + f"{stems[1][len('aachen'):]}_leftImg8bit.png".encode()
    truncate_file(os.fsdecode(os.fsencode(folders[0]) + b"/" + broken), 0.6)
    root = rename(tmp_path / "cs", b"cs\xff")
    shown = broken.decode("utf-8", "backslashreplace")
    return root, f"{tmp_path}/cs\\xff/leftImg8bit/train/aachen/{shown}: cannot decode image PNG"


def test_worker_processes_check_names_that_are_not_utf8(tmp_path: Path) -> None:
    """The reported fault: cv2.imread segfaults on a file name that is not UTF-8, so a worker died and
    verification raised a BrokenProcessPool naming no file. Now it completes, and names the one broken image
    in a form that prints (the byte 0xfe as the text \\xfe)."""
    root, error = cityscapes_not_utf8(tmp_path)
    r = verify_dataset(root, "cityscapes", {"train": 4}, VerifyConfig(workers=2))
    assert r.counts == {"train": 4} and r.errors == [error]
    with pytest.raises(DatasetError) as exc:
        r.raise_if_failed()
    assert error in str(exc.value)
    str(exc.value).encode("utf-8")  # no lone surrogate: printable, loggable


def test_verification_in_this_process_checks_names_that_are_not_utf8(tmp_path: Path) -> None:
    """workers=1 checks in the calling process, which the segfault killed outright (exit -11, no message): run in
    a subprocess, so that the fault fails this test rather than ending the session."""
    root, error = cityscapes_not_utf8(tmp_path)
    code = """
        import sys
        from plca.data.verify import DatasetError, VerifyConfig, verify_dataset
        r = verify_dataset(sys.argv[1], "cityscapes", {"train": 4}, VerifyConfig(workers=1))
        print(r.counts)
        try:
            r.raise_if_failed()
        except DatasetError as exc:
            print(exc)
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), root], capture_output=True, encoding="utf-8",
        errors="backslashreplace", env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"}, timeout=300,
    )
    assert proc.returncode == 0, f"verification exited {proc.returncode} (-11: segfault):\n{proc.stderr}"
    assert proc.stdout.splitlines() == [
        "{'train': 4}", f"{tmp_path}/cs\\xff: cityscapes dataset failed verification:", f"  {error}"
    ]


def _dies_on_some_pairs(jobs: list[tuple[verify.Pair, str, bool]]) -> list:
    """verify._check_batch in a worker process that dies (as on a segfault) when given a pair of DYING."""
    if any(pair.name in DYING for pair, _, _ in jobs):
        os.kill(os.getpid(), signal.SIGKILL)
    return verify._check_batch(jobs)  # the worker's own module: not monkeypatched there


def test_a_worker_process_that_dies_is_named_not_a_bare_broken_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should a worker die anyway (another decoder crash, the OOM killer), verification names the pairs it
    died on and checks every other pair, instead of raising BrokenProcessPool naming no file."""
    write_gta5(tmp_path / "g", 40, size=(6, 8))  # 3 batches of _CHUNKSIZE pairs
    write_palette_png(tmp_path / "g/labels/00035.png", np.full((6, 8), 40, np.uint8), cityscapes_id_palette())
    monkeypatch.setattr(verify, "_check_batch", _dies_on_some_pairs)
    r = verify_dataset(tmp_path / "g", "gta5", {"all": 40}, VerifyConfig(workers=2))
    died = [f"{tmp_path}/g/images/{n}.png: the process checking this image and its label {tmp_path}/g/labels/{n}.png"
            " died (crashed or killed) while reading them" for n in DYING]
    assert r.errors == [*died, f"{tmp_path}/g/labels/00035.png: label values [40] are outside the gta5 class table"]
    assert r.counts == {"all": 40}
    with pytest.raises(DatasetError, match="00020.png: the process checking"):
        r.raise_if_failed()
    # a process that keeps dying: verification stops, naming the pairs, once more than _MAX_CRASHES have killed one
    monkeypatch.setattr(verify, "_MAX_CRASHES", 1)
    with pytest.raises(DatasetError, match=r"(?s)died on 2 image/label pairs:.*00020\.png.*00021\.png"):
        verify_dataset(tmp_path / "g", "gta5", {"all": 40}, VerifyConfig(workers=2))

