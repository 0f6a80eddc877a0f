"""plca.io, the one atomic writer: whole files or none, readable by anyone, and exactly the bytes the hand-written
writers it replaced produced (the pipeline's committed outputs are compared byte for byte)."""

from __future__ import annotations

import ast
import csv
import json
import os
import stat
from pathlib import Path
from typing import IO

import cv2
import numpy as np
import pytest

import plca.report
from plca.io import (
    ImageError,
    atomic_write,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_png,
    atomic_write_text,
    read_image,
    remove_leftovers,
    show_path,
    write_image,
)

#: A file name that is not UTF-8: OpenCV 5.0's cv2.imread and cv2.imwrite crash the process (SIGSEGV) on it.
NOT_UTF8 = b"bad\xff_leftImg8bit.png"


def not_utf8(folder: Path, name: bytes = NOT_UTF8) -> str:
    """The path of `name` (bytes that are not UTF-8) in `folder`, as Python holds it (surrogate escapes)."""
    return os.fsdecode(os.fsencode(folder) + b"/" + name)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.bin"  # missing folders are created
    assert atomic_write(path, lambda f: f.write(b"first")) == path
    assert path.read_bytes() == b"first"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0o600
    atomic_write(path, lambda f: f.write(b"second"))
    assert path.read_bytes() == b"second" and leftovers(path.parent) == []


def test_a_failing_writer_keeps_the_previous_file_and_removes_the_temporary(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    atomic_write_text(path, "kept\n")

    def half_then_fail(f: IO[bytes]) -> None:
        f.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "kept\n" and leftovers(tmp_path) == []
    with pytest.raises(TypeError):
        atomic_write_json({"not json": object()}, tmp_path / "new.json")
    assert not (tmp_path / "new.json").exists() and leftovers(tmp_path) == []


def test_text_is_utf8_without_newline_translation(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "t.md", "mean ± std\r\nline\n")
    assert (tmp_path / "t.md").read_bytes() == "mean ± std\r\nline\n".encode()


def old_write_json(obj: object, path: Path) -> None:
    """plca/experiment.py::_write_json as it was written by hand."""
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")


def test_json_bytes_equal_the_hand_written_writer(tmp_path: Path) -> None:
    obj = {"run": "plca/s0", "miou": 31.29166, "z": [1, 2.5, None], "a": {"nan": float("nan"), "name": "café"}}
    old_write_json(obj, tmp_path / "old.json")
    atomic_write_json(obj, tmp_path / "new.json")
    assert (tmp_path / "new.json").read_bytes() == (tmp_path / "old.json").read_bytes()
    assert (tmp_path / "new.json").read_bytes().endswith(b"}\n")
    assert list(json.loads((tmp_path / "new.json").read_text())) == ["run", "miou", "z", "a"]  # not sorted


def old_write_csv(rows: list[dict[str, float]], path: Path) -> None:
    """plca/engine/trainer.py::write_csv_atomic's content, as it was written by hand."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    columns = columns or ["step", "lr"]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize("rows", [
    [],
    [{"step": 0, "lr": 0.01, "loss": 1.5}],
    [{"step": 0, "lr": 0.01}, {"step": 10, "lr": 0.009, "fass": 0.25, "loss": 2.0}, {"step": 20, "lr": 0.008}],
])
def test_csv_bytes_equal_the_hand_written_writer(tmp_path: Path, rows: list[dict[str, float]]) -> None:
    old_write_csv(rows, tmp_path / "old.csv")
    atomic_write_csv(rows, tmp_path / "new.csv")
    assert (tmp_path / "new.csv").read_bytes() == (tmp_path / "old.csv").read_bytes()


def test_csv_columns_in_first_appearance_and_the_empty_log(tmp_path: Path) -> None:
    atomic_write_csv([], tmp_path / "empty.csv")
    assert (tmp_path / "empty.csv").read_bytes() == b"step,lr\r\n"
    atomic_write_csv([{"step": 0, "lr": 0.5}, {"step": 1, "fass": 2.0, "lr": 0.25}], tmp_path / "two.csv")
    assert (tmp_path / "two.csv").read_bytes() == b"step,lr,fass\r\n0,0.5,\r\n1,0.25,2.0\r\n"


@pytest.mark.parametrize(("image", "params"), [
    (np.arange(24 * 40, dtype=np.uint32).reshape(24, 40).astype(np.uint8), ()),  # a label map
    (np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8), ()),  # a BGR image
    (np.random.default_rng(1).integers(0, 65536, (6, 10, 3), dtype=np.uint16), ()),  # SYNTHIA's 16-bit labels
    (np.random.default_rng(2).integers(0, 256, (16, 20, 3), dtype=np.uint8), (cv2.IMWRITE_PNG_COMPRESSION, 9)),
])
def test_png_bytes_equal_cv2_imwrite(tmp_path: Path, image: np.ndarray, params: tuple[int, ...]) -> None:
    assert cv2.imwrite(str(tmp_path / "imwrite.png"), image, list(params))
    atomic_write_png(image, tmp_path / "atomic.png", params)
    assert (tmp_path / "atomic.png").read_bytes() == (tmp_path / "imwrite.png").read_bytes()
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "atomic.png"), cv2.IMREAD_UNCHANGED), image)


def test_png_that_cannot_be_encoded_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot encode"):
        atomic_write_png(np.zeros((4, 4, 7), np.uint8), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_report_package_keeps_exporting_the_same_writers() -> None:
    assert plca.report.atomic_write is atomic_write and plca.report.atomic_write_text is atomic_write_text


def test_no_other_hand_written_temp_and_rename_writer() -> None:
    """Outside plca/io.py, only folder-level swaps (a staged dataset folder renamed into place: extract.py,
    embedded.py) and the resumable download's rename of a finished part file (download.py) may call os.replace."""
    root = Path(__file__).resolve().parents[1]
    allowed = {"plca/io.py", "plca/data/extract.py", "plca/data/embedded.py", "plca/data/download.py"}
    found = set()
    for folder in ("plca", "stages"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            if "mkstemp" in text or "os.replace(" in text:
                found.add(path.relative_to(root).as_posix())
    assert found <= allowed, f"hand-written atomic writers outside plca/io.py: {sorted(found - allowed)}"


def test_the_leftovers_of_a_killed_write_are_removed_and_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    target.write_bytes(b"good")
    stale = [tmp_path / ".last.pt.abc123.tmp", tmp_path / ".last.pt.x.tmp"]
    keep = [tmp_path / ".other.pt.abc.tmp", tmp_path / "last.pt.tmp", tmp_path / ".last.pt.abc"]
    for p in stale + keep:
        p.write_bytes(b"partial")
    assert remove_leftovers(target) == sorted(stale)
    assert target.read_bytes() == b"good" and all(p.exists() for p in keep) and not any(p.exists() for p in stale)
    assert remove_leftovers(tmp_path / "missing" / "x.csv") == []


IMAGES = {
    "bgr": np.random.default_rng(3).integers(0, 256, (6, 10, 3), dtype=np.uint8),
    "bgra": np.random.default_rng(4).integers(0, 256, (6, 10, 4), dtype=np.uint8),
    "grey": np.random.default_rng(5).integers(0, 256, (6, 10), dtype=np.uint8),
    "16-bit": np.random.default_rng(6).integers(0, 65536, (6, 10, 3), dtype=np.uint16),  # SYNTHIA labels
}


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_read_image_gives_imread_arrays_for_a_name_that_is_not_utf8(tmp_path: Path, kind: str) -> None:
    """The reported crash: cv2.imread(name) segfaults when the name is not UTF-8. read_image never hands OpenCV
    the name, and gives cv2.imread's array for every flag (here compared on a copy under a plain name)."""
    assert cv2.imwrite(str(tmp_path / "plain.png"), IMAGES[kind])
    bad = not_utf8(tmp_path)
    with open(os.fsencode(bad), "wb") as f:
        f.write((tmp_path / "plain.png").read_bytes())
    for flags in (cv2.IMREAD_COLOR, cv2.IMREAD_UNCHANGED, cv2.IMREAD_GRAYSCALE, cv2.IMREAD_ANYDEPTH):
        expected = cv2.imread(str(tmp_path / "plain.png"), flags)
        for path in (bad, Path(bad), os.fsencode(bad)):
            got = read_image(path, flags)
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(read_image(bad), cv2.imread(str(tmp_path / "plain.png")))  # IMREAD_COLOR


@pytest.mark.parametrize(("kind", "suffix", "params"), [
    ("bgr", ".png", ()),
    ("grey", ".png", (cv2.IMWRITE_PNG_COMPRESSION, 1)),  # the resize stage's setting
    ("16-bit", ".png", (cv2.IMWRITE_PNG_COMPRESSION, 9)),
    ("bgr", ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 100)),
])
def test_write_image_writes_imwrite_bytes_to_a_name_that_is_not_utf8(
    tmp_path: Path, kind: str, suffix: str, params: tuple[int, ...]
) -> None:
    """cv2.imwrite segfaults on such a name too; write_image writes the bytes imwrite writes for a plain one."""
    assert cv2.imwrite(str(tmp_path / f"plain{suffix}"), IMAGES[kind], list(params))
    bad = not_utf8(tmp_path, b"bad\xff" + suffix.encode())
    assert write_image(bad, IMAGES[kind], params) == Path(bad)
    with open(os.fsencode(bad), "rb") as f:
        assert f.read() == (tmp_path / f"plain{suffix}").read_bytes()
    assert sorted(os.listdir(os.fsencode(tmp_path))) == [b"bad\xff" + suffix.encode(), f"plain{suffix}".encode()]
    assert stat.S_IMODE(os.stat(os.fsencode(bad)).st_mode) == 0o644


def test_write_image_that_cannot_be_encoded_names_the_file_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"bad\\xff\.png: cannot encode an array of shape \(4, 4, 7\)") as exc:
        write_image(not_utf8(tmp_path, b"bad\xff.png"), np.zeros((4, 4, 7), np.uint8))
    str(exc.value).encode("utf-8")  # printable
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("content", [
    np.random.default_rng(7).bytes(300),  # random bytes named .png
    b"",  # an empty file
    b"\x89PNG\r\n\x1a\n" + b"\0" * 40,  # a PNG signature and nothing readable after it
])
def test_read_image_names_a_file_that_does_not_decode(tmp_path: Path, content: bytes) -> None:
    """cv2.imread gives None (a caller must name the file itself) or, on this name, crashes; read_image raises
    ImageError naming the file in a form that prints (the byte 0xff as the text \\xff)."""
    bad = not_utf8(tmp_path)
    with open(os.fsencode(bad), "wb") as f:
        f.write(content)
    with pytest.raises(ImageError) as exc:
        read_image(bad, cv2.IMREAD_UNCHANGED)
    message = str(exc.value)
    assert message.startswith(f"{tmp_path}/bad\\xff_leftImg8bit.png: ")
    assert "cannot decode the image" in message or "empty file" in message
    message.encode("utf-8")  # no lone surrogate: printable, loggable, writable to a UTF-8 file
    assert isinstance(exc.value, ValueError)


def test_read_image_of_a_missing_file_or_a_folder_raises_oserror_naming_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.png"):
        read_image(tmp_path / "nothing.png")
    with pytest.raises(IsADirectoryError):
        read_image(tmp_path)


def test_show_path_prints_any_file_name() -> None:
    plain = "/data/cs/aachen_000000_000019_leftImg8bit.png"
    assert show_path(Path(plain)) == plain
    assert show_path("/data/café/ü.png") == "/data/café/ü.png"  # UTF-8 names are left as they are
    assert show_path(b"/data/bad\xff.png") == "/data/bad\\xff.png"
    assert show_path(os.fsdecode(b"/data/bad\xff.png")) == "/data/bad\\xff.png"
    assert show_path(Path(os.fsdecode(b"/d/\xe9t\xe9.png"))) == "/d/\\xe9t\\xe9.png"  # Latin-1 bytes
    assert show_path("odd\udc00name") == "odd\\udc00name"  # a surrogate no byte gave


def test_no_image_is_read_or_written_by_name_outside_plca_io() -> None:
    """cv2.imread/cv2.imwrite crash on a file name that is not UTF-8: every image of the package goes through
    plca.io's read_image/write_image, which hand OpenCV bytes only."""
    root = Path(__file__).resolve().parents[1]
    found = []
    for path in sorted((root / "plca").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                "imread", "imwrite", "imreadmulti", "imreadanimation", "imwritemulti"
            ):
                found.append(f"{path.relative_to(root).as_posix()}:{node.lineno}")
    assert found == [], f"images read or written by file name with OpenCV: {found}"
