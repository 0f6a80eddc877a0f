"""Safe extraction: unsafe members refused by name before anything is written (zip, tar and RAR alike),
encrypted / unknown-method / duplicate members, the expansion limit (from the listing and while writing),
atomic placement, RAR through an external tool, and check_archive."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest
from fixture_archives import fake_bsdtar, fake_rar, fake_unrar, patch_zip_member, rar_bytes, zip_tree

from plca.data.extract import (
    COMPLETE_MARKER,
    ArchiveError,
    ArchivePart,
    ExpansionLimitError,
    ExtractConfig,
    UnsafeArchiveError,
    UnsupportedMemberError,
    check_archive,
    extract_into_place,
    is_complete,
    read_marker,
    safe_extract,
    staging_dir,
)

# A zip bomb can be small: 2 MB of zeros deflate to about 2 KB.
ZEROS = b"\0" * 2_000_000
# Limits low enough for tiny fixtures: 10 times the archive's size, no allowance.
TIGHT = dict(max_expansion_ratio=10.0, expansion_allowance_bytes=0)


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
    rar.write_bytes(rar_bytes(zip_tree(src)))
    assert safe_extract(rar, tmp_path / "out", cfg) == 1
    assert (tmp_path / "out/RAND_CITYSCAPES/RGB/0000000.png").read_bytes() == b"rgb"


def test_rar_with_escaping_name_is_refused_before_extraction(tmp_path: Path) -> None:
    tool = fake_unrar(tmp_path / "bin")
    rar = fake_rar(tmp_path / "evil.rar", {"ok.png": b"x", "../../evil.png": b"x"})
    with pytest.raises(UnsafeArchiveError, match=r"'../../evil.png' would land outside"):
        safe_extract(rar, tmp_path / "out", ExtractConfig(rar_tools=[str(tool)]))
    assert not (tmp_path / "unrar-x-called").exists()  # the extract command never ran


def rar_tool(kind: str, folder: Path) -> Path:
    return fake_unrar(folder) if kind == "unrar" else fake_bsdtar(folder)


@pytest.mark.parametrize("tool", ["unrar", "bsdtar"])
def test_rar_symlink_is_refused_before_the_tool_writes_anything(tmp_path: Path, tool: str) -> None:
    # Fault B: the RAR path checked links only after the tool had extracted; a symlinked folder followed by a
    # member inside it wrote outside the target before the check refused the tree.
    outside = tmp_path / "outside"
    outside.mkdir()
    rar = fake_rar(tmp_path / "link.rar", {"RGB.symlink": str(outside).encode(), "RGB/0000000.png": b"pwned"})
    cfg = ExtractConfig(rar_tools=[str(rar_tool(tool, tmp_path / "bin"))])
    with pytest.raises(UnsafeArchiveError) as err:
        extract_into_place([ArchivePart(rar)], tmp_path / "syn", cfg)
    assert list(outside.iterdir()) == []  # nothing was written through the link
    assert not (tmp_path / "unrar-x-called").exists()  # the extract command never ran
    assert f"link.rar: member 'RGB' is a symbolic link (to '{outside}')" in str(err.value)
    assert not (tmp_path / "syn").exists() and not staging_dir(tmp_path / "syn").exists()


@pytest.mark.parametrize("tool", ["unrar", "bsdtar"])
def test_rar_hard_link_is_refused_before_extraction(tmp_path: Path, tool: str) -> None:
    rar = fake_rar(tmp_path / "hard.rar", {"a.png": b"a", "b.png.hardlink": b"a.png"})
    cfg = ExtractConfig(rar_tools=[str(rar_tool(tool, tmp_path / "bin"))])
    with pytest.raises(UnsafeArchiveError, match=r"hard.rar: member 'b.png' is a hard link \(to 'a.png'\)"):
        safe_extract(rar, tmp_path / "out", cfg)
    assert not (tmp_path / "unrar-x-called").exists()


def test_rar_encrypted_member_is_refused_naming_archive_and_member(tmp_path: Path) -> None:
    rar = fake_rar(tmp_path / "enc.rar", {"ok.png": b"x", "RGB/secret.png.encrypted": b"x"})
    cfg = ExtractConfig(rar_tools=[str(fake_unrar(tmp_path / "bin"))])
    with pytest.raises(UnsupportedMemberError, match=r"enc.rar: member 'RGB/secret.png.encrypted' is encrypted"):
        safe_extract(rar, tmp_path / "out", cfg)
    assert not (tmp_path / "unrar-x-called").exists()


def test_rar_failing_tool_names_the_archive_and_what_the_tool_said(tmp_path: Path) -> None:
    # bsdtar lists no encryption: the tool's own failure is reported with its message (naming the member)
    rar = fake_rar(tmp_path / "enc.rar", {"ok.png": b"x", "secret.png.encrypted": b"x"})
    cfg = ExtractConfig(rar_tools=[str(fake_bsdtar(tmp_path / "bin"))])
    with pytest.raises(ArchiveError, match=r"enc.rar: bsdtar failed \(exit 3\): secret.png.encrypted: encrypted"):
        safe_extract(rar, tmp_path / "out", cfg)


def test_rar_without_the_signature_is_refused(tmp_path: Path) -> None:
    rar = make_zip(tmp_path / "plain.rar", {"a": b"a"})
    with pytest.raises(ArchiveError, match=r"plain.rar: not a RAR archive: it does not start with the RAR signature"):
        safe_extract(rar, tmp_path / "out", ExtractConfig(rar_tools=[str(fake_unrar(tmp_path / "bin"))]))


def test_rar_without_a_tool_says_what_to_install(tmp_path: Path) -> None:
    rar = fake_rar(tmp_path / "x.rar", {"a": b"a"})
    with pytest.raises(ArchiveError, match=r"x.rar: RAR archives need an external extractor.*unrar"):
        safe_extract(rar, tmp_path / "out", ExtractConfig(rar_tools=["no-such-unrar-tool"]))


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an archive")
    with pytest.raises(ArchiveError, match="notes.txt: not a zip, tar or rar archive"):
        safe_extract(tmp_path / "notes.txt", tmp_path / "out")


# ------------------------------------------------------------------------------------------ expansion limit


def test_expansion_limit_defaults_and_validation() -> None:
    cfg = ExtractConfig()
    assert cfg.expansion_limit(10 << 30) == 200 << 30  # 20 x a 10 GiB archive
    assert cfg.expansion_limit(1000) == 256 << 20  # small archives get the allowance
    assert ExtractConfig(max_expanded_bytes=5 << 30).expansion_limit(10 << 30) == 5 << 30
    with pytest.raises(ValueError, match="max_expansion_ratio: must be > 0"):
        ExtractConfig(max_expansion_ratio=0)


def test_zip_bomb_is_refused_from_its_listing_before_anything_is_written(tmp_path: Path) -> None:
    # Fault B: nothing limited what an archive expands to (1 MB became 1 GiB)
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.txt", b"small")
        zf.writestr("images/00001.png", ZEROS)
    size = bomb.stat().st_size
    assert size < 10_000
    with pytest.raises(ExpansionLimitError) as err:
        safe_extract(bomb, tmp_path / "out", ExtractConfig(**TIGHT))
    msg = str(err.value)
    assert str(bomb) in msg and f"expands to {len(ZEROS) + 5} bytes" in msg
    assert f"the limit of {10 * size} bytes (max_expansion_ratio 10 x its {size} bytes" in msg
    assert list((tmp_path / "out").rglob("*")) == []
    # with the default limits (a 256 MiB allowance) the same archive is fine
    assert safe_extract(bomb, tmp_path / "ok") == 2


def test_tar_bomb_is_refused_from_its_listing(tmp_path: Path) -> None:
    info = tar_member("zeros.bin")
    bomb = make_tar(tmp_path / "bomb.tar.gz", [info], {"zeros.bin": ZEROS})
    with pytest.raises(ExpansionLimitError, match=r"bomb.tar.gz: its listing says it expands to 2000000 bytes"):
        extract_into_place([ArchivePart(bomb)], tmp_path / "raw/x", ExtractConfig(**TIGHT))
    assert not (tmp_path / "raw/x").exists() and not staging_dir(tmp_path / "raw/x").exists()


def test_absolute_cap_applies_whatever_the_ratio(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "a.zip", {"a.bin": os.urandom(5000)})  # incompressible: ratio about 1
    with pytest.raises(ExpansionLimitError, match=r"a.zip: .* at most max_expanded_bytes 4000\)"):
        safe_extract(archive, tmp_path / "out", ExtractConfig(max_expanded_bytes=4000))


@pytest.mark.parametrize("tool", ["unrar", "bsdtar"])
def test_rar_listing_that_lies_is_stopped_while_the_tool_writes(tmp_path: Path, tool: str) -> None:
    # The listing says 0 bytes; the member holds 2 MB of zeros, written slowly: the watch stops the tool.
    rar = fake_rar(tmp_path / "liar.rar", {"RGB/big.lie.png": ZEROS}, method=zipfile.ZIP_DEFLATED)
    cfg = ExtractConfig(rar_tools=[str(rar_tool(tool, tmp_path / "bin"))], max_expansion_ratio=1.0,
                        expansion_allowance_bytes=200_000, watch_interval_s=0.05)
    with pytest.raises(ExpansionLimitError) as err:
        extract_into_place([ArchivePart(rar)], tmp_path / "syn", cfg)
    msg = str(err.value)
    assert str(rar) in msg and "the limit of 200000 bytes" in msg and f"while {tool} extracted it" in msg
    assert (tmp_path / "unrar-x-called").exists() and not (tmp_path / "unrar-x-finished").exists()  # stopped
    assert not (tmp_path / "syn").exists() and not staging_dir(tmp_path / "syn").exists()


# ------------------------------------------------------------------------------ encrypted, unknown, duplicate


def zip_bytes(members: dict[str, bytes] | list[tuple[str, bytes]]) -> bytes:
    """Zip bytes of `members`; a list may name a member twice."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of a duplicate name, and writes it
        for name, data in members.items() if isinstance(members, dict) else members:
            zf.writestr(zipfile.ZipInfo(name), data)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (dict(flag_bits=0x1), r"member 'images/secret.png' is encrypted \(it needs a password\)"),
        (dict(method=9), r"member 'images/secret.png' is compressed with method 9 \(deflate64\)"),
        (dict(method=77), r"member 'images/secret.png' is compressed with method 77 \(unknown\)"),
    ],
)
def test_zip_member_that_cannot_be_read_is_refused_naming_archive_and_member(tmp_path: Path, patch: dict,
                                                                             message: str) -> None:
    # Fault B: these ended in a bare RuntimeError / NotImplementedError naming neither archive nor member,
    # after the members before them had been written
    data = zip_bytes({"images/ok.png": b"ok", "images/secret.png": b"secret"})
    archive = tmp_path / "odd.zip"
    archive.write_bytes(patch_zip_member(data, "images/secret.png", **patch))
    with pytest.raises(UnsupportedMemberError, match=f"odd.zip: {message}"):
        safe_extract(archive, tmp_path / "out")
    assert list((tmp_path / "out").rglob("*")) == []


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([("a/x.png", b"1"), ("a/x.png", b"2")], r"member 'a/x.png' appears twice"),
        ([("a/x.png", b"1"), ("a\\x.png", b"2")], r"members 'a/x.png' and 'a\\\\x.png' both land on 'a/x.png'"),
        ([("a", b"1"), ("a/x.png", b"2")], r"member 'a' is a file, but member 'a/x.png' needs a folder"),
        ([("a/", b""), ("a", b"2")], r"members 'a/' and 'a' both land on 'a'"),
    ],
)
def test_zip_duplicate_members_are_refused_naming_them(tmp_path: Path, members: list, message: str) -> None:
    # Fault B: a second member of the same name overwrote the first silently
    archive = tmp_path / "dup.zip"
    archive.write_bytes(zip_bytes(members))
    with pytest.raises(UnsafeArchiveError, match=f"dup.zip: {message}"):
        safe_extract(archive, tmp_path / "out")
    assert list((tmp_path / "out").rglob("*")) == []


def test_tar_and_rar_duplicate_members_are_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for payload in (b"first", b"second"):
            info = tar_member("d/f.txt")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    (tmp_path / "dup.tar").write_bytes(buf.getvalue())
    with pytest.raises(UnsafeArchiveError, match=r"dup.tar: member 'd/f.txt' appears twice"):
        safe_extract(tmp_path / "dup.tar", tmp_path / "out")
    rar = tmp_path / "dup.rar"
    rar.write_bytes(rar_bytes(zip_bytes([("RGB/0.png", b"1"), ("RGB/0.png", b"2")])))
    with pytest.raises(UnsafeArchiveError, match=r"dup.rar: member 'RGB/0.png' appears twice"):
        safe_extract(rar, tmp_path / "out2", ExtractConfig(rar_tools=[str(fake_unrar(tmp_path / "bin"))]))
    assert not (tmp_path / "unrar-x-called").exists()


# ------------------------------------------------------------------------------------------ check_archive


def test_check_archive_accepts_whole_archives_and_names_what_is_wrong(tmp_path: Path) -> None:
    good = make_zip(tmp_path / "g.zip", {"images/00001.png": os.urandom(4000), "images/00002.png": b"x"})
    assert check_archive(good) == "zip"
    data = good.read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[: len(data) // 2])  # a download cut short
    with pytest.raises(ArchiveError, match=r"cut.zip: starts like a zip archive, but its end .* cut short\?"):
        check_archive(tmp_path / "cut.zip")
    damaged = bytearray(data)
    damaged[40] ^= 0xFF  # inside the first member's data: its CRC fails
    (tmp_path / "crc.zip").write_bytes(bytes(damaged))
    with pytest.raises(ArchiveError, match=r"crc.zip: member 'images/00001.png' is damaged"):
        check_archive(tmp_path / "crc.zip")
    # members extraction refuses anyway are not read (no RuntimeError here)
    (tmp_path / "enc.zip").write_bytes(patch_zip_member(zip_bytes({"s.png": b"s"}), "s.png", flag_bits=1))
    assert check_archive(tmp_path / "enc.zip") == "zip"


def test_check_archive_reads_a_tar_listing_to_its_end(tmp_path: Path) -> None:
    tar = make_tar(tmp_path / "t.tar.gz", [tar_member("a.bin"), tar_member("b.bin")],
                   {"a.bin": os.urandom(20000), "b.bin": os.urandom(20000)})
    assert check_archive(tar) == "tar"
    data = tar.read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(ArchiveError, match=r"cut.tar.gz: .*(cut short|not a whole tar archive)"):
        check_archive(tmp_path / "cut.tar.gz")


def test_check_archive_of_a_rar_checks_signature_and_listing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = ExtractConfig(rar_tools=[str(fake_unrar(tmp_path / "bin"))])
    rar = fake_rar(tmp_path / "s.rar", {"RAND_CITYSCAPES/RGB/0000000.png": os.urandom(3000)})
    assert check_archive(rar, cfg) == "rar"
    data = rar.read_bytes()
    (tmp_path / "cut.rar").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArchiveError, match=r"cut.rar: unrar cannot list it \(damaged, cut short"):
        check_archive(tmp_path / "cut.rar", cfg)
    (tmp_path / "page.rar").write_bytes(b"<html><body>Not found</body></html>")
    with pytest.raises(ArchiveError, match=r"page.rar: not a RAR archive"):
        check_archive(tmp_path / "page.rar", cfg)
    # without any extractor only the signature can be checked, and the log says so
    assert check_archive(rar, ExtractConfig(rar_tools=["no-such-unrar"])) == "rar"
    assert "checked its signature only" in caplog.text
