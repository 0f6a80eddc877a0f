"""Safe extraction: unsafe members refused by name, atomic placement, RAR through an external tool."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
from fixture_archives import fake_unrar, zip_tree

from plca.data.extract import (
    COMPLETE_MARKER,
    ArchiveError,
    ArchivePart,
    ExtractConfig,
    UnsafeArchiveError,
    extract_into_place,
    is_complete,
    read_marker,
    safe_extract,
    staging_dir,
)


def make_zip(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3  # Unix: st_mode in the high bits of external_attr
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def make_tar(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info in members:
            payload = (data or {}).get(info.name)
            if payload is not None:
                info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def test_good_zip_is_extracted_with_backslash_names_as_folders(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "a.zip", {"data/x.txt": b"x", "data\\sub\\y.txt": b"y", "data/": b""})
    n = safe_extract(archive, tmp_path / "out")
    assert n == 3
    assert (tmp_path / "out/data/x.txt").read_bytes() == b"x"
    assert (tmp_path / "out/data/sub/y.txt").read_bytes() == b"y"


@pytest.mark.parametrize(
    ("member", "why"),
    [("../x", "outside the target"), ("a/../../x", "outside the target"), ("/etc/evil", "absolute"),
     ("C:/evil", "absolute"), ("..\\x", "outside the target")],
)
def test_zip_member_escaping_the_target_is_refused_by_name(tmp_path: Path, member: str, why: str) -> None:
    archive = make_zip(tmp_path / "bad.zip", {"ok.txt": b"fine", member: b"evil"})
    with pytest.raises(UnsafeArchiveError) as err:
        safe_extract(archive, tmp_path / "out")
    assert repr(member) in str(err.value) and why in str(err.value) and "bad.zip" in str(err.value)
    # refused before anything was written, and nothing landed beside the target
    assert list((tmp_path / "out").rglob("*")) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip", "out"]


def test_zip_symlink_member_is_refused_by_name(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "link.zip", {"a.txt": b"a"}, symlinks={"images/00001.png": "/etc/passwd"})
    with pytest.raises(UnsafeArchiveError, match=r"'images/00001.png' is a symbolic link"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out/images/00001.png").exists()


@pytest.mark.parametrize(
    ("info", "message"),
    [
        (tar_member("../x"), "'../x' would land outside"),
        (tar_member("/abs/x"), "'/abs/x' has an absolute path"),
        (tar_member("l", tarfile.SYMTYPE, "/etc/passwd"), "'l' is a symbolic link"),
        (tar_member("h", tarfile.LNKTYPE, "/etc/passwd"), "'h' is a hard link"),
        (tar_member("dev", tarfile.CHRTYPE), "'dev' is a device"),
        (tar_member("fifo", tarfile.FIFOTYPE), "'fifo' is a device"),
    ],
)
def test_tar_unsafe_members_are_refused_by_name(tmp_path: Path, info: tarfile.TarInfo, message: str) -> None:
    archive = make_tar(tmp_path / "bad.tar.gz", [tar_member("ok.txt"), info], {"ok.txt": b"ok", "../x": b"e"})
    with pytest.raises(UnsafeArchiveError, match=message):
        safe_extract(archive, tmp_path / "out")
    assert list((tmp_path / "out").rglob("*")) == []


def test_good_tar_is_extracted(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "a.tar.gz", [tar_member("d", tarfile.DIRTYPE), tar_member("d/f.txt")],
                       {"d/f.txt": b"hello"})
    assert safe_extract(archive, tmp_path / "out") == 2
    assert (tmp_path / "out/d/f.txt").read_bytes() == b"hello"


def test_corrupt_zip_names_the_archive(tmp_path: Path) -> None:
    good = make_zip(tmp_path / "g.zip", {"images/00001.png": os.urandom(4000)})
    broken = tmp_path / "broken.zip"
    broken.write_bytes(good.read_bytes()[:-200])  # central directory cut off
    with pytest.raises(ArchiveError, match="broken.zip"):
        safe_extract(broken, tmp_path / "out")
    # a member whose data was damaged fails its CRC check, naming archive and member
    data = bytearray(good.read_bytes())
    data[40] ^= 0xFF
    (tmp_path / "crc.zip").write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match=r"crc.zip.*images/00001.png"):
        safe_extract(tmp_path / "crc.zip", tmp_path / "out2")


def test_extract_into_place_merges_parts_and_marks_complete(tmp_path: Path) -> None:
    a = make_zip(tmp_path / "01_images.zip", {"images/00001.png": b"i1", "README": b"a"})
    b = make_zip(tmp_path / "01_labels.zip", {"labels/00001.png": b"l1", "README": b"b"})
    target = tmp_path / "raw/gta5"
    seen = []
    extract_into_place([ArchivePart(a), ArchivePart(b)], target, check=lambda d: seen.append(sorted(os.listdir(d))),
                       marker={"dataset": "gta5"})
    assert seen == [["README", "images", "labels"]]  # the check saw the staged copy before the rename
    assert (target / "images/00001.png").read_bytes() == b"i1"
    assert (target / "labels/00001.png").read_bytes() == b"l1"
    assert is_complete(target)
    assert read_marker(target) == {"dataset": "gta5", "parts": ["01_images.zip", "01_labels.zip"]}
    assert not staging_dir(target).exists()


def test_failed_extraction_leaves_no_target_and_keeps_an_older_one(tmp_path: Path) -> None:
    good = make_zip(tmp_path / "good.zip", {"images/00001.png": b"new"})
    evil = make_zip(tmp_path / "evil.zip", {"../escape.txt": b"x"})
    target = tmp_path / "raw/gta5"
    with pytest.raises(UnsafeArchiveError, match="escape.txt"):
        extract_into_place([ArchivePart(good), ArchivePart(evil)], target)
    assert not target.exists() and not staging_dir(target).exists()
    assert not (tmp_path / "raw/escape.txt").exists() and not (tmp_path / "escape.txt").exists()
    # an older complete copy survives a failed replacement (here a failing check)
    extract_into_place([ArchivePart(good)], target)
    old = tmp_path / "old.zip"
    make_zip(old, {"images/00002.png": b"other"})

    def refuse(folder: Path) -> None:
        raise ValueError("wrong layout")

    with pytest.raises(ValueError, match="wrong layout"):
        extract_into_place([ArchivePart(old)], target, check=refuse)
    assert (target / "images/00001.png").read_bytes() == b"new" and not (target / "images/00002.png").exists()


def test_interrupted_run_leaves_only_an_incomplete_staging_folder_that_the_next_run_removes(tmp_path: Path) -> None:
    target = tmp_path / "raw/gta5"
    archive = make_zip(tmp_path / "p.zip", {"images/00001.png": b"i"})
    # a run killed mid-extraction (no cleanup ran) leaves half a tree in the staging folder only
    stale = staging_dir(target)
    (stale / "images").mkdir(parents=True)
    (stale / "images/half.png").write_bytes(b"half")
    assert not target.exists() and not is_complete(target)
    extract_into_place([ArchivePart(archive)], target)
    assert sorted(p.name for p in (target / "images").iterdir()) == ["00001.png"]
    assert not stale.exists() and (target / COMPLETE_MARKER).is_file()


def test_subdir_of_the_archive_becomes_the_dataset_root(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "s.zip", {"RAND_CITYSCAPES/RGB/0000000.png": b"r"})
    extract_into_place([ArchivePart(archive, "RAND_CITYSCAPES")], tmp_path / "syn")
    assert (tmp_path / "syn/RGB/0000000.png").read_bytes() == b"r"
    with pytest.raises(ArchiveError, match="expected a top-level folder 'WRONG'"):
        extract_into_place([ArchivePart(archive, "WRONG")], tmp_path / "syn2")
    assert not (tmp_path / "syn2").exists()


def test_rar_goes_through_the_external_tool_and_is_checked(tmp_path: Path) -> None:
    tool = fake_unrar(tmp_path / "bin")
    cfg = ExtractConfig(rar_tools=[str(tool)])
    src = tmp_path / "src"
    (src / "RAND_CITYSCAPES/RGB").mkdir(parents=True)
    (src / "RAND_CITYSCAPES/RGB/0000000.png").write_bytes(b"rgb")
    rar = tmp_path / "good.rar"
    rar.write_bytes(zip_tree(src))
    assert safe_extract(rar, tmp_path / "out", cfg) == 1
    assert (tmp_path / "out/RAND_CITYSCAPES/RGB/0000000.png").read_bytes() == b"rgb"


def test_rar_with_escaping_name_is_refused_before_extraction(tmp_path: Path) -> None:
    tool = fake_unrar(tmp_path / "bin")
    rar = make_zip(tmp_path / "evil.rar", {"ok.png": b"x", "../../evil.png": b"x"})
    with pytest.raises(UnsafeArchiveError, match=r"'../../evil.png' would land outside"):
        safe_extract(rar, tmp_path / "out", ExtractConfig(rar_tools=[str(tool)]))
    assert not (tmp_path / "unrar-x-called").exists()  # the extract command never ran


def test_rar_symlink_is_caught_after_extraction(tmp_path: Path) -> None:
    tool = fake_unrar(tmp_path / "bin")
    rar = make_zip(tmp_path / "link.rar", {"RGB/0000000.png.symlink": b"/etc/passwd"})
    with pytest.raises(UnsafeArchiveError, match=r"'RGB/0000000.png' is a symbolic link"):
        extract_into_place([ArchivePart(rar)], tmp_path / "syn", ExtractConfig(rar_tools=[str(tool)]))
    assert not (tmp_path / "syn").exists() and not staging_dir(tmp_path / "syn").exists()


def test_rar_without_a_tool_says_what_to_install(tmp_path: Path) -> None:
    rar = make_zip(tmp_path / "x.rar", {"a": b"a"})
    with pytest.raises(ArchiveError, match=r"x.rar: RAR archives need an external extractor.*unrar"):
        safe_extract(rar, tmp_path / "out", ExtractConfig(rar_tools=["no-such-unrar-tool"]))


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an archive")
    with pytest.raises(ArchiveError, match="notes.txt: not a zip, tar or rar archive"):
        safe_extract(tmp_path / "notes.txt", tmp_path / "out")
