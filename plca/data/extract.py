"""Safe extraction of dataset archives (zip, tar, rar) into place.

Every member is checked from the archive's listing before anything is written, for every format: absolute
paths, `..` components, symbolic and hard links and device files are refused with an error naming the member;
so are encrypted members, members compressed with a method that cannot be read here, and two members that would
land on the same path (nothing is overwritten silently). What an archive may expand to is limited
(ExtractConfig: a ratio to the archive's size, an allowance, an optional cap): the listing's total is checked
before extracting, and the bytes actually written are counted while extracting, since a listing can lie.
Archives are unpacked into a temporary folder next to the target, checked, and renamed into place only when
complete, so an interrupted run never leaves a half dataset under the target's name.

zip and tar are read with the standard library. RAR (SYNTHIA's format) has no standard-library reader: an
external tool (unrar or bsdtar) lists it (with member types, sizes and encryption: `unrar lt`, `bsdtar -tvf`),
the listing is checked as above, and only then the tool extracts it, watched for the limit; the unpacked tree is
checked again afterwards (no links, no devices) in case the tool made something its listing did not show.

check_archive tells whether a file is a whole archive without extracting it (used for downloads that have no
published checksum).
"""

from __future__ import annotations

import json
import logging
import lzma
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from plca.io import atomic_write_text

log = logging.getLogger(__name__)

#: File written into a dataset folder once it is complete (extracted and checked).
COMPLETE_MARKER = ".complete.json"
_STAGING_SUFFIX = ".extracting"
_OLD_SUFFIX = ".replaced"
_COPY_CHUNK = 1 << 20
# Start of every RAR file (versions 1.5 to 5).
_RAR_SIGNATURE = b"Rar!\x1a\x07"
# Start of a zip file's first member (local file header) and of a gzip stream (a .tar.gz).
_ZIP_LOCAL_HEADER = b"PK\x03\x04"
_GZIP_MAGIC = b"\x1f\x8b"
# A Windows drive prefix such as "C:" makes a member absolute on Windows even without a leading slash.
_DRIVE = re.compile(r"^[A-Za-z]:")
# zip compression methods the standard library reads; the names of some others, for error messages.
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_ZIP_METHOD_NAMES = {6: "implode", 9: "deflate64", 10: "PKWARE implode", 18: "IBM TERSE", 19: "IBM LZ77",
                     93: "zstandard", 95: "xz", 96: "JPEG", 97: "WavPack", 98: "PPMd", 99: "AES"}
# Errors a decompressor or a truncated member raises while it is read.
_READ_ERRORS = (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError)
# `unrar lt` (technical listing): "        Name: a/b.png", "        Type: File", "        Size: 123", ...
_UNRAR_FIELD = re.compile(r"^\s*(Name|Type|Target|Size|Attributes|Flags): ?(.*)$")
# `bsdtar -tvf`: "-rw-r--r--  0 root   root        2 Nov 29 21:17 d/a.txt" (ls -l style; links add "-> x" or
# "link to x"; devices show "major,minor" for the size).
_BSDTAR_LINE = re.compile(
    r"^(?P<mode>\S{10}\S?)\s+\d+\s+\S+\s+\S+\s+(?P<size>\d+|\d+,\s*\d+)\s+\S+\s+\S+\s+\S+ (?P<name>.*)$"
)


class ArchiveError(ValueError):
    """An archive cannot be read or extracted (corrupt, unknown format, missing extractor)."""


class UnsafeArchiveError(ArchiveError):
    """An archive member would land outside the target folder, is a link or a device file, or would overwrite
    another member."""


class UnsupportedMemberError(ArchiveError):
    """An archive member cannot be extracted here: encrypted, or compressed with a method no reader here has."""


class ExpansionLimitError(ArchiveError):
    """An archive expands (or claims to expand) to more than ExtractConfig allows: a zip bomb, or a lying listing."""


@dataclass
class ExtractConfig:
    """Options of extraction."""

    #: External RAR extractors tried in order (name on PATH or a path); the kind is told by the file name,
    #: which must start with "unrar" or "bsdtar".
    rar_tools: list[str] = field(default_factory=lambda: ["unrar", "bsdtar"])
    #: An archive may expand to this many times its own size. The datasets are PNG images, which do not compress
    #: further (about 1:1); a zip bomb expands a thousandfold or more.
    max_expansion_ratio: float = 20.0
    #: ... or to this many bytes, whichever is more (a small archive of text files compresses well).
    expansion_allowance_bytes: int = 256 << 20
    #: Absolute cap on what one archive may expand to, whatever its size; None = the ratio alone.
    max_expanded_bytes: int | None = None
    #: Seconds between two measurements of what an external RAR extractor has written so far.
    watch_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if not self.max_expansion_ratio > 0:
            raise ValueError(f"max_expansion_ratio: must be > 0, got {self.max_expansion_ratio}")
        if self.expansion_allowance_bytes < 0:
            raise ValueError(f"expansion_allowance_bytes: must be >= 0, got {self.expansion_allowance_bytes}")
        if self.max_expanded_bytes is not None and self.max_expanded_bytes <= 0:
            raise ValueError(f"max_expanded_bytes: must be > 0 or null, got {self.max_expanded_bytes}")
        if not self.watch_interval_s > 0:
            raise ValueError(f"watch_interval_s: must be > 0, got {self.watch_interval_s}")

    def expansion_limit(self, archive_bytes: int) -> int:
        """Bytes an archive of `archive_bytes` bytes may expand to."""
        limit = max(int(self.max_expansion_ratio * archive_bytes), self.expansion_allowance_bytes)
        return limit if self.max_expanded_bytes is None else min(limit, self.max_expanded_bytes)

    def describe_limit(self, archive_bytes: int) -> str:
        """The limit and where it comes from, for error messages."""
        cap = "" if self.max_expanded_bytes is None else f", at most max_expanded_bytes {self.max_expanded_bytes}"
        return (
            f"the limit of {self.expansion_limit(archive_bytes)} bytes (max_expansion_ratio "
            f"{self.max_expansion_ratio:g} x its {archive_bytes} bytes, at least expansion_allowance_bytes "
            f"{self.expansion_allowance_bytes}{cap})"
        )


@dataclass
class ArchivePart:
    """One archive to unpack into a dataset folder; `subdir` is the folder inside it that holds the dataset root."""

    path: Path
    subdir: str | None = None


def member_path(name: str, archive: Path | str) -> PurePosixPath | None:
    """The relative path a member may be written to; None for the archive's root entry.

    Backslashes count as separators (some archives of Windows origin, SYNTHIA's among them, use them).
    """
    norm = name.replace("\\", "/")
    if norm.startswith("/") or _DRIVE.match(norm):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to extract")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} would land outside the target folder ('..')")
    return PurePosixPath(*parts) if parts else None


def _refuse_type(archive: Path, name: str, what: str) -> None:
    raise UnsafeArchiveError(f"{archive}: member {name!r} is {what}; refusing to extract")


# ----------------------------------------------------------------------------------------------- listings


@dataclass
class _Member:
    """One entry of an archive's listing, in the same terms for every format."""

    name: str  # as the archive stores it
    kind: str  # "file", "dir", or what else it is, as an error says it ("a symbolic link (to '/x')")
    size: int | None = None  # uncompressed size the listing gives; None when it gives none
    unsupported: str | None = None  # why it cannot be extracted here (encrypted, unknown method)
    ref: Any = None  # the ZipInfo / TarInfo to read it from
    rel: PurePosixPath | None = None  # where it lands (set by _plan)


def _zip_members(zf: zipfile.ZipFile) -> list[_Member]:
    members = []
    for info in zf.infolist():
        kind = "dir" if info.is_dir() or info.filename.endswith("\\") else "file"
        mode = info.external_attr >> 16
        # Unix-made zips keep st_mode in the high bits of external_attr; links and devices live there.
        # (No type bits at all, as some writers leave, means a plain file.)
        if info.create_system == 3 and stat.S_IFMT(mode):
            if stat.S_ISLNK(mode):
                kind = "a symbolic link"
            elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                kind = "a device, FIFO or socket"
        unsupported = None
        if info.flag_bits & 0x1:
            unsupported = "encrypted (it needs a password)"
        elif kind == "file" and info.compress_type not in _ZIP_METHODS:
            method = _ZIP_METHOD_NAMES.get(info.compress_type, "unknown")
            unsupported = (f"compressed with method {info.compress_type} ({method}), which Python's zipfile cannot "
                           "read (it reads stored, deflate, bzip2 and lzma)")
        members.append(_Member(info.filename, kind, info.file_size, unsupported, info))
    return members


def _tar_members(tf: tarfile.TarFile) -> list[_Member]:
    members = []
    for info in tf.getmembers():  # reads the whole listing
        if info.issym():
            kind = f"a symbolic link (to {info.linkname!r})"
        elif info.islnk():
            kind = f"a hard link (to {info.linkname!r})"
        elif info.isdev():
            kind = "a device or FIFO"
        elif info.isdir():
            kind = "dir"
        elif info.isfile():
            kind = "file"
        else:
            kind = f"of unsupported tar type {info.type!r}"
        members.append(_Member(info.name, kind, info.size if info.isfile() else None, None, info))
    return members


def _unrar_members(text: str) -> list[_Member]:
    """Members from `unrar lt` (its technical listing: one "Name:" block per member)."""
    blocks: list[dict[str, str]] = []
    for line in text.splitlines():
        match = _UNRAR_FIELD.match(line)
        if not match:
            continue
        key, value = match.groups()
        if key == "Name":
            blocks.append({"Name": value})
        elif blocks:
            blocks[-1][key] = value
    members = []
    for b in blocks:
        name, kind_text, attrs = b["Name"], b.get("Type", "File"), b.get("Attributes", "")
        target = f" (to {b['Target']!r})" if "Target" in b else ""
        if kind_text in ("Service", "NTFS alternate data stream"):
            continue  # not written as files on this system
        if kind_text == "Directory":
            kind = "dir"
        elif kind_text in ("Unix symbolic link", "Windows symbolic link", "NTFS junction point") or \
                attrs.startswith("l"):
            kind = f"a symbolic link{target}"
        elif kind_text in ("Hard link", "File reference"):
            kind = f"a hard link{target}"
        elif kind_text == "File":
            kind = "file"
        else:
            kind = f"of unsupported RAR type {kind_text!r}"
        size = b.get("Size", "").strip()
        encrypted = "encrypted" in b.get("Flags", "")
        members.append(_Member(name, kind, int(size) if size.isdigit() else None,
                               "encrypted (it needs a password)" if encrypted else None))
    return members


def _bsdtar_members(text: str, archive: Path) -> list[_Member]:
    """Members from `bsdtar -tvf` (ls -l style lines)."""
    members = []
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _BSDTAR_LINE.match(line)
        if not match:
            raise ArchiveError(f"{archive}: cannot read this line of bsdtar's listing: {line!r}")
        mode, size, name = match.group("mode"), match.group("size"), match.group("name")
        if mode[0] == "l":
            name, _, target = name.partition(" -> ")
            kind = f"a symbolic link (to {target!r})"
        elif mode[0] == "h":
            name, _, target = name.partition(" link to ")
            kind = f"a hard link (to {target!r})"
        elif mode[0] == "d":
            kind = "dir"
        elif mode[0] == "-":
            kind = "file"
        else:
            kind = "a device, FIFO or socket"
        members.append(_Member(name, kind, int(size) if size.isdigit() else None))
    return members


def _plan(archive: Path, members: Sequence[_Member], cfg: ExtractConfig) -> list[_Member]:
    """Check every member before anything is written; returns those to write, with their paths set.

    Refuses escaping paths, links and devices, members that cannot be read here, two members landing on one
    path (or a file where another member needs a folder), and a listed total above the expansion limit.
    """
    files: dict[PurePosixPath, str] = {}
    dirs: dict[PurePosixPath, str] = {}
    for m in members:
        m.rel = member_path(m.name, archive)
        if m.kind not in ("file", "dir"):
            _refuse_type(archive, m.name, m.kind)
        if m.unsupported:
            raise UnsupportedMemberError(f"{archive}: member {m.name!r} is {m.unsupported}; cannot extract it")
        if m.rel is None:
            continue
        if m.kind == "dir":
            if m.rel in files:
                _refuse_duplicate(archive, files[m.rel], m.name, m.rel)
            dirs.setdefault(m.rel, m.name)
            continue
        other = files.get(m.rel) or dirs.get(m.rel)
        if other is not None:
            _refuse_duplicate(archive, other, m.name, m.rel)
        files[m.rel] = m.name
    for rel, name in files.items():
        for parent in rel.parents:
            if parent in files:
                raise UnsafeArchiveError(
                    f"{archive}: member {files[parent]!r} is a file, but member {name!r} needs a folder of that "
                    "name; refusing to extract"
                )
    size = archive.stat().st_size
    total = sum(m.size or 0 for m in members if m.kind == "file")
    if total > cfg.expansion_limit(size):
        raise ExpansionLimitError(
            f"{archive}: its listing says it expands to {total} bytes, more than {cfg.describe_limit(size)}; "
            "refusing to extract (a zip bomb? if the archive is genuine, raise the limit in the extract options)"
        )
    return [m for m in members if m.rel is not None]


def _refuse_duplicate(archive: Path, first: str, second: str, rel: PurePosixPath) -> None:
    same = f"member {first!r} appears twice" if first == second else f"members {first!r} and {second!r} both land on"
    where = "" if first == second else f" {str(rel)!r}"
    raise UnsafeArchiveError(f"{archive}: {same}{where}; refusing to extract (one would overwrite the other)")


# ----------------------------------------------------------------------------------------------- writing


class _Budget:
    """Bytes written so far for one archive, against its expansion limit."""

    def __init__(self, archive: Path, cfg: ExtractConfig) -> None:
        self.archive, self.cfg = archive, cfg
        self.size = archive.stat().st_size
        self.limit = cfg.expansion_limit(self.size)
        self.used = 0

    def spend(self, n: int, member: str) -> None:
        self.used += n
        if self.used > self.limit:
            raise self.exceeded(f"while writing member {member!r}")

    def exceeded(self, when: str) -> ExpansionLimitError:
        return ExpansionLimitError(
            f"{self.archive}: expanded past {self.cfg.describe_limit(self.size)} {when}, although its listing "
            "said less; stopped and refusing it (a zip bomb or a forged listing?)"
        )


def _copy_member(src: IO[bytes], out: IO[bytes], member: _Member, archive: Path, budget: _Budget) -> None:
    written = 0
    while chunk := src.read(_COPY_CHUNK):
        written += len(chunk)
        if member.size is not None and written > member.size:
            raise ExpansionLimitError(
                f"{archive}: member {member.name!r} holds more than the {member.size} bytes its listing gives; "
                "refusing it (a forged listing?)"
            )
        budget.spend(len(chunk), member.name)
        out.write(chunk)


def _write_members(
    archive: Path, dest: Path, plan: Sequence[_Member], open_member: Callable[[Any], IO[bytes] | None],
    cfg: ExtractConfig,
) -> int:
    """Write each planned member below dest (paths already checked); the same for zip and tar."""
    budget = _Budget(archive, cfg)
    for m in plan:
        assert m.rel is not None
        target = dest / m.rel
        if m.kind == "dir":
            target.mkdir(parents=True, exist_ok=True)
            continue
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            src = open_member(m.ref)  # a zip member checks its CRC while it is read
            if src is None:
                raise ArchiveError(f"{archive}: member {m.name!r} has no data")
            # "x": never replace a file, whatever the listing said (a duplicate is an error, not an update)
            with src, target.open("xb") as out:
                _copy_member(src, out, m, archive, budget)
        except FileExistsError:
            raise UnsafeArchiveError(
                f"{archive}: member {m.name!r} would overwrite {m.rel} written before; refusing to extract"
            ) from None
        except (RuntimeError, NotImplementedError) as exc:  # zipfile: encrypted, or an unknown method
            raise UnsupportedMemberError(f"{archive}: member {m.name!r} cannot be extracted: {exc}") from exc
        except _READ_ERRORS as exc:
            raise ArchiveError(f"{archive}: cannot extract member {m.name!r}: {exc}") from exc
    return len(plan)


def _extract_zip(archive: Path, dest: Path, cfg: ExtractConfig) -> int:
    try:
        with zipfile.ZipFile(archive) as zf:
            plan = _plan(archive, _zip_members(zf), cfg)
            return _write_members(archive, dest, plan, zf.open, cfg)
    except zipfile.BadZipFile as exc:
        raise ArchiveError(f"{archive}: not a valid zip archive: {exc}") from exc


def _extract_tar(archive: Path, dest: Path, cfg: ExtractConfig) -> int:
    try:
        with tarfile.open(archive) as tf:
            plan = _plan(archive, _tar_members(tf), cfg)
            return _write_members(archive, dest, plan, tf.extractfile, cfg)
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise ArchiveError(f"{archive}: not a valid tar archive: {exc}") from exc


# ----------------------------------------------------------------------------------------------- rar


def _rar_commands(tool: str, archive: Path, dest: Path) -> tuple[list[str], list[str]]:
    kind = Path(tool).name
    if kind.startswith("unrar"):
        # lt: technical listing (type, size, flags of every member); -p-: never prompt for a password;
        # -o+: overwrite (the listing was checked for duplicates); -y: assume yes.
        return [tool, "lt", "-p-", str(archive)], [tool, "x", "-p-", "-o+", "-y", "-idq", str(archive), f"{dest}/"]
    if kind.startswith("bsdtar"):
        return [tool, "-tvf", str(archive)], [tool, "-xf", str(archive), "-C", str(dest), "--no-same-owner"]
    raise ArchiveError(f"RAR extractor {tool!r}: unknown kind (its file name must start with 'unrar' or 'bsdtar')")


def _rar_tool(cfg: ExtractConfig) -> str | None:
    found = [t for t in cfg.rar_tools if shutil.which(t)]
    return (shutil.which(found[0]) or found[0]) if found else None


def _head(path: Path) -> bytes:
    """The first bytes of a file, as many as the RAR signature has."""
    try:
        with path.open("rb") as fh:
            return fh.read(len(_RAR_SIGNATURE))
    except OSError as exc:
        raise ArchiveError(f"{path}: cannot read: {exc}") from exc


def _check_rar_signature(archive: Path) -> None:
    if _head(archive) != _RAR_SIGNATURE:
        raise ArchiveError(f"{archive}: not a RAR archive: it does not start with the RAR signature 'Rar!'")


def _rar_members(tool: str, archive: Path) -> list[_Member]:
    list_cmd, _ = _rar_commands(tool, archive, archive.parent)
    listing = subprocess.run(list_cmd, capture_output=True, text=True, errors="replace", stdin=subprocess.DEVNULL)
    if listing.returncode != 0:
        said = (listing.stderr.strip() or listing.stdout.strip())[-500:]
        raise ArchiveError(f"{archive}: {Path(tool).name} cannot list it (damaged, cut short, or encrypted "
                           f"headers?): {said}")
    if Path(tool).name.startswith("unrar"):
        return _unrar_members(listing.stdout)
    return _bsdtar_members(listing.stdout, archive)


def _tree_bytes(root: Path) -> int:
    """Bytes of the files under root (links not followed)."""
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:  # the extractor may rename its temporary files meanwhile
                pass
    return total


def _extract_rar(archive: Path, dest: Path, cfg: ExtractConfig) -> int:
    _check_rar_signature(archive)
    tool = _rar_tool(cfg)
    if tool is None:
        raise ArchiveError(
            f"{archive}: RAR archives need an external extractor and none of {cfg.rar_tools} was found; "
            "install one (e.g. `apt-get install unrar` or `apt-get install libarchive-tools` for bsdtar)"
        )
    plan = _plan(archive, _rar_members(tool, archive), cfg)  # everything is refused before the tool writes
    _, extract_cmd = _rar_commands(tool, archive, dest)
    budget = _Budget(archive, cfg)
    before = _tree_bytes(dest)
    # The tool writes by itself: measure what it wrote every watch_interval_s and stop it past the limit.
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(extract_cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        try:
            while True:
                try:
                    code = proc.wait(timeout=cfg.watch_interval_s)
                    break
                except subprocess.TimeoutExpired:
                    if _tree_bytes(dest) - before > budget.limit:
                        raise budget.exceeded(f"while {Path(tool).name} extracted it") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if _tree_bytes(dest) - before > budget.limit:
            raise budget.exceeded(f"when {Path(tool).name} had extracted it")
        if code != 0:
            err.seek(0)
            said = err.read().decode("utf-8", "replace").strip()[-500:]
            raise ArchiveError(f"{archive}: {Path(tool).name} failed (exit {code}): {said}")
    _split_backslash_names(dest, archive)
    return len(plan)


def _split_backslash_names(root: Path, archive: Path) -> None:
    """Move files whose names hold backslashes (Windows separators kept by some extractors) into folders."""
    for path in sorted(root.rglob("*")):
        if "\\" in path.name and not path.is_symlink() and path.is_file():
            rel = member_path(str(path.relative_to(root)), archive)
            if rel is None:
                continue
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)


# ----------------------------------------------------------------------------------------------- checks


def check_tree(root: Path, archive: Path | str) -> None:
    """Refuse a tree holding anything but plain folders and files (links, devices, hard-linked files)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root)
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                _refuse_type(Path(archive), str(rel), "a symbolic link")
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                _refuse_type(Path(archive), str(rel), "a device, FIFO or socket")
            if st.st_nlink > 1:
                _refuse_type(Path(archive), str(rel), "a hard link")


def archive_kind(path: Path) -> str:
    """'rar' (by name or signature), 'zip' or 'tar' (by content)."""
    head = _head(path)
    if path.suffix.lower() == ".rar" or head == _RAR_SIGNATURE:
        return "rar"
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise ArchiveError(f"{path}: cannot read: {exc}") from exc
    if head.startswith(_ZIP_LOCAL_HEADER):
        raise ArchiveError(f"{path}: starts like a zip archive, but its end (the central directory) is missing or "
                           "damaged: cut short?")
    if head.startswith(_GZIP_MAGIC):
        raise ArchiveError(f"{path}: a gzip stream that holds no readable tar archive: cut short or damaged?")
    raise ArchiveError(f"{path}: not a zip, tar or rar archive")


def check_archive(archive: Path | str, cfg: ExtractConfig | None = None) -> str:
    """Check that `archive` is a whole, readable archive, without extracting it; returns its kind.

    zip: the central directory and every member's CRC (members that extraction refuses anyway, encrypted or of
    an unknown method, are not read); tar: the listing is read to its end; rar: the signature and the listing
    of the first RAR extractor found (the signature alone when none is installed: extraction reports the rest).
    Raises ArchiveError naming the file, and the member where one is at fault.
    """
    archive, cfg = Path(archive), cfg or ExtractConfig()
    kind = archive_kind(archive)
    if kind == "zip":
        try:
            with zipfile.ZipFile(archive) as zf:
                for m in _zip_members(zf):
                    if m.kind != "file" or m.unsupported:
                        continue
                    try:
                        with zf.open(m.ref) as src:
                            while src.read(_COPY_CHUNK):
                                pass
                    except _READ_ERRORS as exc:
                        raise ArchiveError(f"{archive}: member {m.name!r} is damaged: {exc}") from exc
        except zipfile.BadZipFile as exc:
            raise ArchiveError(f"{archive}: not a valid zip archive: {exc}") from exc
    elif kind == "tar":
        try:
            with tarfile.open(archive) as tf:
                tf.getmembers()
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
            raise ArchiveError(f"{archive}: not a whole tar archive: {exc}") from exc
    else:
        _check_rar_signature(archive)
        tool = _rar_tool(cfg)
        if tool is None:
            log.warning("%s: no RAR extractor (%s) installed; checked its signature only", archive, cfg.rar_tools)
        else:
            _rar_members(tool, archive)
    return kind


# ----------------------------------------------------------------------------------------------- in place


def safe_extract(archive: Path | str, dest: Path | str, cfg: ExtractConfig | None = None) -> int:
    """Extract `archive` into folder `dest` (created if missing); returns the number of members written.

    Every member is checked from the listing before anything is written (for rar too); unsafe members raise
    UnsafeArchiveError naming the member, encrypted or unreadable ones UnsupportedMemberError, and an archive
    expanding past the limit ExpansionLimitError.
    """
    archive, dest, cfg = Path(archive), Path(dest), cfg or ExtractConfig()
    dest.mkdir(parents=True, exist_ok=True)
    kind = archive_kind(archive)
    if kind == "zip":
        n = _extract_zip(archive, dest, cfg)
    elif kind == "tar":
        n = _extract_tar(archive, dest, cfg)
    else:
        n = _extract_rar(archive, dest, cfg)
    check_tree(dest, archive)
    return n


def _merge_into(src: Path, dest: Path) -> None:
    """Move the contents of `src` into `dest` (same file system: renames, no copies)."""
    dest.mkdir(parents=True, exist_ok=True)
    for entry in sorted(src.iterdir()):
        target = dest / entry.name
        if entry.is_dir() and target.is_dir():
            _merge_into(entry, target)
        else:
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)  # files shared by several archives (README, license.txt): last one wins


def staging_dir(target: Path) -> Path:
    """The temporary folder next to `target` that an extraction fills before it is renamed into place."""
    return target.parent / f".{target.name}{_STAGING_SUFFIX}"


def is_complete(target: Path | str) -> bool:
    """True if `target` was put in place by extract_into_place (its completion marker exists)."""
    return (Path(target) / COMPLETE_MARKER).is_file()


def read_marker(target: Path | str) -> dict[str, Any] | None:
    """The completion record of a dataset folder, or None when it is not complete."""
    path = Path(target) / COMPLETE_MARKER
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def extract_into_place(
    parts: Sequence[ArchivePart],
    target: Path | str,
    cfg: ExtractConfig | None = None,
    check: Callable[[Path], Any] | None = None,
    marker: dict[str, Any] | None = None,
) -> Path:
    """Unpack all `parts` into a temporary folder next to `target`, run `check` on it, then rename it to `target`.

    `check(folder)` raises to stop before anything replaces `target`. A completion marker holding `marker` is
    written last. A leftover temporary folder from an interrupted run is removed first.
    """
    target, cfg = Path(target), cfg or ExtractConfig()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(target)
    if staging.exists():
        log.info("removing %s left by an interrupted extraction", staging)
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        for i, part in enumerate(parts):
            unpack = staging / f".unpack-{i}"
            n = safe_extract(part.path, unpack, cfg)
            root = unpack
            if part.subdir:
                root = unpack / part.subdir
                if not root.is_dir():
                    raise ArchiveError(f"{part.path}: expected a top-level folder {part.subdir!r} in the archive")
            log.info("extracted %d members of %s", n, part.path.name)
            _merge_into(root, staging)
            shutil.rmtree(unpack, ignore_errors=True)
        if check is not None:
            check(staging)
        record = {"parts": [p.path.name for p in parts], **(marker or {})}
        atomic_write_text(staging / COMPLETE_MARKER, json.dumps(record, indent=2, sort_keys=True))
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def replace_dir(staging: Path, target: Path) -> None:
    """Rename folder `staging` to `target`, replacing an older `target` (moved aside first, then removed)."""
    old = target.parent / f".{target.name}{_OLD_SUFFIX}"
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    if old.exists():
        shutil.rmtree(old)
