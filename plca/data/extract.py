"""Safe extraction of dataset archives (zip, tar, rar) into place.

Every member is checked before anything is written: absolute paths, `..` components, symbolic and hard links and
device files are refused with an error naming the member. Archives are unpacked into a temporary folder next to
the target, checked, and renamed into place only when complete, so an interrupted run never leaves a half
dataset under the target's name.

zip and tar are read with the standard library. RAR (SYNTHIA's format) has no standard-library reader: an
external tool (unrar or bsdtar) lists and extracts it, and the unpacked tree is checked afterwards the same way.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import subprocess
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from plca.io import atomic_write_text

log = logging.getLogger(__name__)

#: File written into a dataset folder once it is complete (extracted and checked).
COMPLETE_MARKER = ".complete.json"
_STAGING_SUFFIX = ".extracting"
_OLD_SUFFIX = ".replaced"
_COPY_CHUNK = 1 << 20
# Start of every RAR file (versions 1.5 to 5).
_RAR_SIGNATURE = b"Rar!\x1a\x07"
# A Windows drive prefix such as "C:" makes a member absolute on Windows even without a leading slash.
_DRIVE = re.compile(r"^[A-Za-z]:")


class ArchiveError(ValueError):
    """An archive cannot be read or extracted (corrupt, unknown format, missing extractor)."""


class UnsafeArchiveError(ArchiveError):
    """An archive member would land outside the target folder, or is a link or a device file."""


@dataclass
class ExtractConfig:
    """Options of extraction."""

    #: External RAR extractors tried in order (name on PATH or a path); the kind is told by the file name,
    #: which must start with "unrar" or "bsdtar".
    rar_tools: list[str] = field(default_factory=lambda: ["unrar", "bsdtar"])


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


def _zip_plan(zf: zipfile.ZipFile, archive: Path) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    plan = []
    for info in zf.infolist():
        rel = member_path(info.filename, archive)
        mode = info.external_attr >> 16
        # Unix-made zips keep st_mode in the high bits of external_attr; links and devices live there.
        # (No type bits at all, as some writers leave, means a plain file.)
        if info.create_system == 3 and stat.S_IFMT(mode):
            if stat.S_ISLNK(mode):
                _refuse_type(archive, info.filename, "a symbolic link")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                _refuse_type(archive, info.filename, "a device, FIFO or socket")
        if rel is not None:
            plan.append((info, rel))
    return plan


def _tar_plan(tf: tarfile.TarFile, archive: Path) -> list[tuple[tarfile.TarInfo, PurePosixPath]]:
    plan = []
    for info in tf.getmembers():
        rel = member_path(info.name, archive)
        if info.issym():
            _refuse_type(archive, info.name, f"a symbolic link (to {info.linkname!r})")
        if info.islnk():
            _refuse_type(archive, info.name, f"a hard link (to {info.linkname!r})")
        if info.isdev():
            _refuse_type(archive, info.name, "a device or FIFO")
        if not (info.isfile() or info.isdir()):
            _refuse_type(archive, info.name, f"of unsupported tar type {info.type!r}")
        if rel is not None:
            plan.append((info, rel))
    return plan


def _write_member(src: Any, dest: Path, archive: Path, name: str) -> None:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with dest.open("wb") as out:
            shutil.copyfileobj(src, out, _COPY_CHUNK)
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise ArchiveError(f"{archive}: cannot extract member {name!r}: {exc}") from exc


def _write_plan(
    archive: Path,
    dest: Path,
    plan: Sequence[tuple[Any, PurePosixPath]],
    is_dir: Callable[[Any], bool],
    open_member: Callable[[Any], Any],
    name_of: Callable[[Any], str],
) -> int:
    """Write each planned member (checked paths) below dest; the same for zip and tar members."""
    for info, rel in plan:
        target = dest / rel
        if is_dir(info):
            target.mkdir(parents=True, exist_ok=True)
            continue
        src = open_member(info)  # a zip member checks its CRC while it is read
        if src is None:
            raise ArchiveError(f"{archive}: member {name_of(info)!r} has no data")
        with src:
            _write_member(src, target, archive, name_of(info))
    return len(plan)


def _extract_zip(archive: Path, dest: Path) -> int:
    try:
        with zipfile.ZipFile(archive) as zf:
            return _write_plan(archive, dest, _zip_plan(zf, archive), zipfile.ZipInfo.is_dir, zf.open,
                               lambda info: info.filename)
    except zipfile.BadZipFile as exc:
        raise ArchiveError(f"{archive}: not a valid zip archive: {exc}") from exc


def _extract_tar(archive: Path, dest: Path) -> int:
    try:
        with tarfile.open(archive) as tf:
            return _write_plan(archive, dest, _tar_plan(tf, archive), tarfile.TarInfo.isdir, tf.extractfile,
                               lambda info: info.name)
    except tarfile.TarError as exc:
        raise ArchiveError(f"{archive}: not a valid tar archive: {exc}") from exc


def _rar_commands(tool: str, archive: Path, dest: Path) -> tuple[list[str], list[str]]:
    kind = Path(tool).name
    if kind.startswith("unrar"):
        # -p-: never prompt for a password; -o+: overwrite; -y: assume yes; lb: bare list of names.
        return [tool, "lb", "-p-", str(archive)], [tool, "x", "-p-", "-o+", "-y", "-idq", str(archive), f"{dest}/"]
    if kind.startswith("bsdtar"):
        return [tool, "-tf", str(archive)], [tool, "-xf", str(archive), "-C", str(dest), "--no-same-owner"]
    raise ArchiveError(f"RAR extractor {tool!r}: unknown kind (its file name must start with 'unrar' or 'bsdtar')")


def _extract_rar(archive: Path, dest: Path, cfg: ExtractConfig) -> int:
    found = [t for t in cfg.rar_tools if shutil.which(t)]
    if not found:
        raise ArchiveError(
            f"{archive}: RAR archives need an external extractor and none of {cfg.rar_tools} was found; "
            "install one (e.g. `apt-get install unrar` or `apt-get install libarchive-tools` for bsdtar)"
        )
    tool = shutil.which(found[0]) or found[0]
    list_cmd, extract_cmd = _rar_commands(tool, archive, dest)
    listing = subprocess.run(list_cmd, capture_output=True, text=True)
    if listing.returncode != 0:
        raise ArchiveError(f"{archive}: {Path(tool).name} cannot list it: {listing.stderr.strip()[-500:]}")
    names = [line for line in listing.stdout.splitlines() if line.strip()]
    for name in names:
        member_path(name, archive)  # refuse escaping names before anything is written
    done = subprocess.run(extract_cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ArchiveError(f"{archive}: {Path(tool).name} failed: {done.stderr.strip()[-500:]}")
    _split_backslash_names(dest, archive)
    return len(names)


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
    try:
        with path.open("rb") as fh:
            head = fh.read(len(_RAR_SIGNATURE))
    except OSError as exc:
        raise ArchiveError(f"{path}: cannot read: {exc}") from exc
    if path.suffix.lower() == ".rar" or head == _RAR_SIGNATURE:
        return "rar"
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except OSError as exc:
        raise ArchiveError(f"{path}: cannot read: {exc}") from exc
    raise ArchiveError(f"{path}: not a zip, tar or rar archive")


def safe_extract(archive: Path | str, dest: Path | str, cfg: ExtractConfig | None = None) -> int:
    """Extract `archive` into folder `dest` (created if missing); returns the number of members written.

    Unsafe members raise UnsafeArchiveError naming the member; zip and tar are checked before any write.
    """
    archive, dest, cfg = Path(archive), Path(dest), cfg or ExtractConfig()
    dest.mkdir(parents=True, exist_ok=True)
    kind = archive_kind(archive)
    if kind == "zip":
        n = _extract_zip(archive, dest)
    elif kind == "tar":
        n = _extract_tar(archive, dest)
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
