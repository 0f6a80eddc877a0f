"""Readers of the real layouts, on tiny fixtures written in exactly those formats."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
from real_formats import (
    cityscapes_paths,
    truncate_file,
    write_cityscapes,
    write_grey_png,
    write_gta5,
    write_palette_png,
    write_rgb_png,
    write_synthia,
)

from plca.data.datasets import CityscapesReader, DataError, GTA5Reader, SynthiaReader, read_label_png, read_rgb
from plca.data.labels import CITYSCAPES_ID_TO_TRAINID, SYNTHIA_ID_TO_TRAINID, LabelError


def test_gta5_reads_palette_indices_as_ids(tmp_path):
    truth = write_gta5(tmp_path, 3, size=(12, 20), palette=True)
    # cv2 would expand the palette to colours: the reader must return the indices themselves
    assert cv2.imread(str(tmp_path / "labels" / "00001.png"), cv2.IMREAD_UNCHANGED).ndim == 3
    reader = GTA5Reader(tmp_path)
    assert len(reader) == 3 and reader.names == ["00001", "00002", "00003"]
    for i, name in enumerate(reader.names):
        s = reader.read(i)
        assert s.name == name
        assert s.image.shape == (12, 20, 3) and s.image.dtype == np.uint8
        assert s.label.dtype == np.uint8
        np.testing.assert_array_equal(s.label, CITYSCAPES_ID_TO_TRAINID[truth[name]])
    # ids that are not train classes (0 unlabeled, 4 static ...) must come out as ignore
    assert 255 in np.concatenate([reader.read(i).label.ravel() for i in range(3)])


def test_gta5_image_is_rgb(tmp_path):
    write_gta5(tmp_path, 1)
    rgb = np.zeros((12, 20, 3), np.uint8)
    rgb[..., 0] = 200  # pure red
    write_rgb_png(tmp_path / "images" / "00001.png", rgb)
    image = GTA5Reader(tmp_path).read(0).image
    assert (image[..., 0] == 200).all() and (image[..., 1:] == 0).all()


def test_gta5_grey_labels_and_split_list(tmp_path):
    truth = write_gta5(tmp_path, 4, palette=False)
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "val.txt").write_text("00004\n00002.png\n\n")
    reader = GTA5Reader(tmp_path, ids=tmp_path / "split" / "val.txt")
    assert reader.names == ["00004", "00002"]
    np.testing.assert_array_equal(reader.read(0).label, CITYSCAPES_ID_TO_TRAINID[truth["00004"]])
    assert GTA5Reader(tmp_path, ids=["00003"]).names == ["00003"]


def test_gta5_split_id_without_image(tmp_path):
    write_gta5(tmp_path, 2)
    with pytest.raises(FileNotFoundError, match="00009"):
        GTA5Reader(tmp_path, ids=["00001", "00009"])


def test_missing_dataset_folder_names_it_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*images/NNNNN\.png"):
        GTA5Reader(tmp_path / "nowhere")
    write_gta5(tmp_path / "g", 1)
    (tmp_path / "g" / "labels" / "00001.png").unlink()
    (tmp_path / "g" / "labels").rmdir()
    with pytest.raises(FileNotFoundError, match=r"g/labels"):
        GTA5Reader(tmp_path / "g")
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/train.*gtFine"):
        CityscapesReader(tmp_path / "g", "train")
    with pytest.raises(FileNotFoundError, match=r"RGB.*GT/LABELS"):
        SynthiaReader(tmp_path / "g")


def test_empty_image_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(FileNotFoundError, match="no PNG images"):
        GTA5Reader(tmp_path)


def test_truncated_image_names_file(tmp_path):
    write_gta5(tmp_path, 2, size=(40, 60))
    truncate_file(tmp_path / "images" / "00002.png", 0.5)
    reader = GTA5Reader(tmp_path)
    reader.read(0)
    with pytest.raises(DataError, match=r"images/00002\.png.*corrupt or truncated"):
        reader.read(1)


def test_corrupt_and_truncated_label_names_file(tmp_path):
    write_gta5(tmp_path, 2, size=(40, 60))
    (tmp_path / "labels" / "00001.png").write_bytes(b"not a png at all")
    truncate_file(tmp_path / "labels" / "00002.png", 0.6)
    reader = GTA5Reader(tmp_path)
    with pytest.raises(DataError, match=r"labels/00001\.png"):
        reader.read(0)
    with pytest.raises(DataError, match=r"labels/00002\.png"):
        reader.read(1)


def test_label_ids_outside_table(tmp_path):
    write_gta5(tmp_path, 1, size=(8, 8))
    ids = np.full((8, 8), 7, np.uint8)
    ids[0, 0] = 77
    write_palette_png(tmp_path / "labels" / "00001.png", ids, np.zeros((256, 3), np.uint8))
    with pytest.raises(LabelError, match=r"labels/00001\.png.*\[77\]"):
        GTA5Reader(tmp_path).read(0)


def test_size_mismatch_error_and_resize(tmp_path, caplog):
    write_gta5(tmp_path, 1, size=(12, 20))
    ids = np.zeros((6, 10), np.uint8)
    ids[:, 5:] = 7  # right half road
    write_grey_png(tmp_path / "labels" / "00001.png", ids)
    with pytest.raises(DataError, match=r"images/00001\.png is 20x12.*labels/00001\.png is 10x6"):
        GTA5Reader(tmp_path).read(0)
    with caplog.at_level(logging.WARNING, logger="plca.data.datasets"):
        s = GTA5Reader(tmp_path, size_mismatch="resize_label").read(0)
    assert s.label.shape == (12, 20)
    assert (s.label[:, 10:] == 0).all() and (s.label[:, :10] == 255).all()
    assert "labels/00001.png" in caplog.text
    with pytest.raises(ValueError, match="size_mismatch"):
        GTA5Reader(tmp_path, size_mismatch="crop")


def test_image_without_label(tmp_path):
    write_gta5(tmp_path, 3)
    (tmp_path / "labels" / "00002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 images without their label.*images/00002\.png.*labels/00002"):
        GTA5Reader(tmp_path)
    write_cityscapes(tmp_path / "cs", splits={"val": 2})
    _, lab = cityscapes_paths(tmp_path / "cs", "val", "frankfurt", 0, 19)
    lab.unlink()
    with pytest.raises(FileNotFoundError, match="frankfurt_000000_000019"):
        CityscapesReader(tmp_path / "cs", "val")
    assert len(CityscapesReader(tmp_path / "cs", "val", with_labels=False)) == 2


def test_cityscapes_reader(tmp_path):
    truth = write_cityscapes(tmp_path, splits={"train": 4, "val": 2}, size=(16, 32), extras=True)
    reader = CityscapesReader(tmp_path, "train")
    assert reader.names == sorted(n for n in truth if not n.startswith(("frankfurt", "lindau")))
    assert reader.names[0] == "aachen_000000_000019"
    for i, name in enumerate(reader.names):
        s = reader.read(i)
        assert s.image.shape == (16, 32, 3) and s.name == name
        np.testing.assert_array_equal(s.label, CITYSCAPES_ID_TO_TRAINID[truth[name]])
    assert len(CityscapesReader(tmp_path, "val")) == 2


def test_cityscapes_train_ids_keep_the_listed_images_in_the_splits_order(tmp_path):
    """A list file as the released CRST writes them (`<image path> <label path>` a line) or as names, in any
    order, with repeats: only those images, each once, in the split's order, labels alongside."""
    write_cityscapes(tmp_path / "cs", splits={"train": 4, "val": 2})
    everything = CityscapesReader(tmp_path / "cs", "train").names
    crst = tmp_path / "train_ClsConfSet.lst"
    crst.write_text("".join(f"leftImg8bit/train/{n.split('_')[0]}/{n}_leftImg8bit.png\t"
                            f"gtFine/train/{n.split('_')[0]}/{n}_gtFine_labelIds.png\n"
                            for n in (everything[3], everything[1])))
    names = tmp_path / "names.txt"
    names.write_text(f"{everything[3]}\n\n{everything[1]}\n{everything[1]}_leftImg8bit.png\n")
    for ids in (crst, str(names), [everything[3], everything[1]]):
        reader = CityscapesReader(tmp_path / "cs", "train", ids=ids)
        assert reader.names == [everything[1], everything[3]]
        assert reader.read(1).name == everything[3] and reader.read(1).label is not None
    (tmp_path / "wrong.txt").write_text("aachen_999999_000019\n")
    with pytest.raises(FileNotFoundError, match=r"Cityscapes split 'train': 1 ids in list file .*wrong.txt have no "
                                                r"image, e.g. \['aachen_999999_000019'\]"):
        CityscapesReader(tmp_path / "cs", "train", ids=tmp_path / "wrong.txt")
    with pytest.raises(FileNotFoundError, match="split list file .*absent.txt not found"):
        CityscapesReader(tmp_path / "cs", "train", ids=tmp_path / "absent.txt")


def test_params_train_ids_choose_the_cityscapes_train_images_only(tmp_path):
    from plca.experiment import make_reader
    from plca.params import DomainConfig

    write_cityscapes(tmp_path / "cs", splits={"train": 4, "val": 2})
    first = CityscapesReader(tmp_path / "cs", "train").names[0]
    (tmp_path / "ids.txt").write_text(first + "\n")
    domain = DomainConfig("cityscapes", tmp_path / "cs", train_ids=str(tmp_path / "ids.txt"))
    assert make_reader(domain, "train").names == [first]
    assert len(make_reader(domain, "val")) == 2  # val is never cut
    with pytest.raises(ValueError, match="train_ids is for cityscapes; a gta5 train list file goes in 'train'"):
        DomainConfig("gta5", tmp_path, train_ids="ids.txt")


def test_cityscapes_without_labels_never_opens_gtfine(tmp_path):
    write_cityscapes(tmp_path, splits={"train": 2})
    # no gtFine at all, as for an images-only download: must still work and return no label
    for p in sorted((tmp_path / "gtFine").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (tmp_path / "gtFine").rmdir()
    reader = CityscapesReader(tmp_path, "train", with_labels=False)
    s = reader.read(1)
    assert s.label is None and s.image.shape == (16, 32, 3)
    assert reader.label_paths is None
    with pytest.raises(FileNotFoundError, match="gtFine/train"):
        CityscapesReader(tmp_path, "train")


def test_cityscapes_rejects_colour_label(tmp_path):
    write_cityscapes(tmp_path, splits={"val": 1}, size=(8, 8))
    _, lab = cityscapes_paths(tmp_path, "val", "frankfurt", 0, 19)
    write_rgb_png(lab, np.full((8, 8, 3), 7, np.uint8))
    with pytest.raises(DataError, match=r"gtFine_labelIds\.png.*single-channel"):
        CityscapesReader(tmp_path, "val").read(0)


def test_synthia_reader_uses_first_rgb_channel(tmp_path):
    truth = write_synthia(tmp_path, 3, size=(12, 20))
    raw = read_label_png(tmp_path / "GT" / "LABELS" / "0000001.png")
    assert raw.dtype == np.uint16 and raw.shape == (12, 20, 3)
    reader = SynthiaReader(tmp_path)
    assert reader.names == ["0000000", "0000001", "0000002"]
    for i, name in enumerate(reader.names):
        s = reader.read(i)
        np.testing.assert_array_equal(s.label, SYNTHIA_ID_TO_TRAINID[truth[name]])
    # SYNTHIA road is class 3 -> train id 0; terrain (16) is ignored in the 16-class protocol
    assert SYNTHIA_ID_TO_TRAINID[3] == 0 and SYNTHIA_ID_TO_TRAINID[16] == 255
    assert SynthiaReader(tmp_path, ids=["0000002"]).names == ["0000002"]


def test_synthia_id_outside_table(tmp_path):
    write_synthia(tmp_path, 1, size=(6, 6))
    gt = np.zeros((6, 6, 3), np.uint16)
    gt[..., 0] = 3
    gt[2, 2, 0] = 300
    write_rgb_png(tmp_path / "GT" / "LABELS" / "0000000.png", gt)
    with pytest.raises(LabelError, match=r"0000000\.png.*300"):
        SynthiaReader(tmp_path).read(0)


def test_a_cityscapes_image_named_otherwise_is_an_error_not_left_out(tmp_path):
    write_cityscapes(tmp_path, splits={"val": 2}, size=(16, 32))
    city = next((tmp_path / "leftImg8bit" / "val").iterdir())
    stray = city / "photo.png"
    cv2.imwrite(str(stray), np.zeros((16, 32, 3), np.uint8))
    with pytest.raises(DataError, match=r"photo.png: not named <city>_<seq>_<frame>_leftImg8bit.png"):
        CityscapesReader(tmp_path, "val")


def run_python(code: str, *args: str | bytes) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter (stdout strict UTF-8, as a UTF-8 log would be): where OpenCV crashes on
    a file name, the fault these tests reproduce, only that process dies, and the test fails with its exit status
    (-11) instead of ending the test session."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, encoding="utf-8",
        errors="backslashreplace", env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"}, timeout=300,
    )


def rename(path: Path | str, new_name: bytes) -> str:
    """Rename a file or folder to a name of raw bytes; its new path as Python holds it (surrogate escapes)."""
    new = os.path.join(os.path.dirname(os.fsencode(path)), new_name)
    os.rename(os.fsencode(path), new)
    return os.fsdecode(new)


def cityscapes_not_utf8(tmp_path: Path) -> tuple[str, dict[bytes, tuple[np.ndarray, np.ndarray]]]:
    """A Cityscapes train split under a folder whose name is not UTF-8, one frame also named so; returns its root
    and {frame name: (RGB image, label ids)} read before the renaming."""
    truth = write_cityscapes(tmp_path / "cs", splits={"train": 3}, cities={"train": ("aachen",)}, size=(8, 16))
    before = {}
    for stem, ids in truth.items():
        before[stem.encode()] = (read_rgb(tmp_path / f"cs/leftImg8bit/train/aachen/{stem}_leftImg8bit.png"), ids)
    stem = sorted(truth)[0]
    new_stem = b"aachen_bad\xff_" + stem.split("_", 1)[1].encode()
    rename(tmp_path / f"cs/leftImg8bit/train/aachen/{stem}_leftImg8bit.png", new_stem + b"_leftImg8bit.png")
    rename(tmp_path / f"cs/gtFine/train/aachen/{stem}_gtFine_labelIds.png", new_stem + b"_gtFine_labelIds.png")
    before[new_stem] = before.pop(stem.encode())
    return rename(tmp_path / "cs", b"cs\xff"), before


def test_readers_read_files_whose_names_are_not_utf8(tmp_path: Path) -> None:
    """The reported crash: the adapt stage exits -11 with no message, as cv2.imread segfaults on a file name
    that is not UTF-8. The readers give the pixels (Cityscapes: RGB image, grey labelIds; SYNTHIA: its 16-bit
    3-channel labels, which go through OpenCV too)."""
    cs_root, cs_truth = cityscapes_not_utf8(tmp_path)
    syn_truth = write_synthia(tmp_path / "syn", 2, size=(8, 16))
    syn_images = {n: read_rgb(tmp_path / f"syn/RGB/{n}.png") for n in syn_truth}
    syn_root = rename(tmp_path / "syn", b"syn\xff")
    proc = run_python(
        """
        import os, pickle, sys
        from plca.data.datasets import CityscapesReader, SynthiaReader
        out = {}
        for kind, reader in (("cs", CityscapesReader(sys.argv[1], "train")), ("syn", SynthiaReader(sys.argv[2]))):
            for i in range(len(reader)):
                s = reader.read(i)
                out[(kind, os.fsencode(s.name))] = (s.image, s.label)
        with open(sys.argv[3], "wb") as f:
            pickle.dump(out, f)
        """,
        cs_root, syn_root, str(tmp_path / "read.pkl"),
    )
    assert proc.returncode == 0, f"reading exited {proc.returncode} (-11: segfault):\n{proc.stderr}"
    with open(tmp_path / "read.pkl", "rb") as f:
        read = pickle.load(f)
    assert sorted(read) == sorted([("cs", n) for n in cs_truth] + [("syn", n.encode()) for n in syn_truth])
    assert ("cs", b"aachen_bad\xff_000000_000019") in read
    for name, (image, ids) in cs_truth.items():
        np.testing.assert_array_equal(read["cs", name][0], image)
        np.testing.assert_array_equal(read["cs", name][1], CITYSCAPES_ID_TO_TRAINID[ids])
    for name, ids in syn_truth.items():
        np.testing.assert_array_equal(read["syn", name.encode()][0], syn_images[name])
        np.testing.assert_array_equal(read["syn", name.encode()][1], SYNTHIA_ID_TO_TRAINID[ids])


def test_a_corrupt_image_whose_name_is_not_utf8_is_named(tmp_path: Path) -> None:
    """Random bytes named *_leftImg8bit.png under a name that is not UTF-8: a DataError naming the file in a form
    that prints (the byte 0xff as the text \\xff), not a crash; the same for a SYNTHIA label."""
    cs_root, _ = cityscapes_not_utf8(tmp_path)
    image = os.fsencode(cs_root) + b"/leftImg8bit/train/aachen/aachen_bad\xff_000000_000019_leftImg8bit.png"
    with open(image, "wb") as f:
        f.write(np.random.default_rng(0).bytes(500))
    write_synthia(tmp_path / "syn", 1, size=(8, 16))
    truncate_file(tmp_path / "syn/GT/LABELS/0000000.png", 0.6)
    syn_root = rename(tmp_path / "syn", b"syn\xff")
    proc = run_python(
        """
        import sys
        from plca.data.datasets import CityscapesReader, DataError, SynthiaReader
        for reader in (CityscapesReader(sys.argv[1], "train"), SynthiaReader(sys.argv[2])):
            for i in range(len(reader)):
                try:
                    reader.read(i)
                except DataError as exc:
                    print(exc)
        """,
        cs_root, syn_root,
    )
    assert proc.returncode == 0, f"reading exited {proc.returncode} (-11: segfault):\n{proc.stderr}"
    assert proc.stdout.splitlines() == [
        f"{tmp_path}/cs\\xff/leftImg8bit/train/aachen/aachen_bad\\xff_000000_000019_leftImg8bit.png: cannot decode "
        "the image (corrupt or truncated file?)",
        f"{tmp_path}/syn\\xff/GT/LABELS/0000000.png: cannot decode the label PNG (mode RGB)",
    ]

