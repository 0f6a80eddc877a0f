"""Archives of tiny fixtures in the real datasets' archive layouts, a sources file pointing at a loopback
server, and a stand-in `unrar` (helpers for the download, extract and resize tests, not tests).

Real archive layouts mirrored here:
- GTA5: NN_images.zip holding images/NNNNN.png, NN_labels.zip holding labels/NNNNN.png.
- Cityscapes: gtFine_trainvaltest.zip holding gtFine/<split>/<city>/..., leftImg8bit_trainvaltest.zip holding
  leftImg8bit/<split>/<city>/..., each with license.txt and README at the top.
- SYNTHIA: SYNTHIA_RAND_CITYSCAPES.rar holding RAND_CITYSCAPES/{RGB,GT/LABELS}/NNNNNNN.png.
"""

from __future__ import annotations

import hashlib
import io
import sys
import zipfile
from pathlib import Path

import yaml
from real_formats import write_cityscapes, write_gta5, write_synthia


def zip_tree(root: Path, members: list[Path] | None = None, extra: dict[str, bytes] | None = None) -> bytes:
    """Zip `members` (default: every file under `root`) with names relative to `root`."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(members if members is not None else (p for p in root.rglob("*") if p.is_file())):
            zf.write(path, path.relative_to(root).as_posix())
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gta5_archives(work: Path, n: int = 4, parts: int = 2, size: tuple[int, int] = (12, 20)) -> dict[str, bytes]:
    """{file name: zip bytes} of GTA5 split into `parts` image and label archives."""
    root = work / "gta5-src"
    write_gta5(root, n, size)
    names = sorted(p.name for p in (root / "images").glob("*.png"))
    per = -(-len(names) // parts)
    out = {}
    for k in range(parts):
        chunk = names[k * per : (k + 1) * per]
        out[f"{k + 1:02d}_images.zip"] = zip_tree(root, [root / "images" / n for n in chunk])
        out[f"{k + 1:02d}_labels.zip"] = zip_tree(root, [root / "labels" / n for n in chunk])
    return out


def cityscapes_archives(work: Path, train: int = 2, val: int = 1, test: int = 1) -> dict[str, bytes]:
    """{file name: zip bytes} of the two Cityscapes packages."""
    root = work / "cityscapes-src"
    write_cityscapes(root, {"train": train, "val": val, "test": test}, size=(8, 16))
    extra = {"license.txt": b"Cityscapes licence (fixture)\n", "README": b"fixture\n"}
    files = [p for p in root.rglob("*.png")]
    return {
        "gtFine_trainvaltest.zip": zip_tree(root, [p for p in files if p.parts[len(root.parts)] == "gtFine"], extra),
        "leftImg8bit_trainvaltest.zip": zip_tree(
            root, [p for p in files if p.parts[len(root.parts)] == "leftImg8bit"], extra
        ),
    }


def synthia_archive(work: Path, n: int = 3) -> dict[str, bytes]:
    """{file name: bytes} of SYNTHIA's one archive: a stand-in RAR (see rar_bytes) for the stand-in unrar."""
    root = work / "synthia-src"
    write_synthia(root / "RAND_CITYSCAPES", n)
    return {"SYNTHIA_RAND_CITYSCAPES.rar": rar_bytes(zip_tree(root))}


#: What every RAR 5 file starts with.
RAR5_SIGNATURE = b"Rar!\x1a\x07\x01\x00"


def rar_bytes(zip_bytes: bytes) -> bytes:
    """A stand-in RAR: zip bytes behind the RAR signature. It passes the signature check, and the stand-in
    unrar/bsdtar read it with zipfile (which finds a zip behind a prefix)."""
    return RAR5_SIGNATURE + zip_bytes


def fake_rar(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> Path:
    """Write a stand-in RAR holding `members` (name -> data; see FAKE_RAR_TOOL for the names that make links,
    encrypted members and lying sizes) to `path`."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    path.write_bytes(rar_bytes(buf.getvalue()))
    return path


def write_sources(path: Path, datasets: dict[str, dict]) -> Path:
    """Write a sources file in plca/data/sources.yaml's schema."""
    path.write_text(yaml.safe_dump({"version": 1, "datasets": datasets}, sort_keys=False))
    return path


FAKE_RAR_TOOL = '''#!{python}
"""Stand-in for unrar and bsdtar (the real unrar cannot be installed here), told apart by the script's name:
it reads a stand-in RAR (zip bytes behind a RAR signature, see fixture_archives.rar_bytes).

unrar lb ARCHIVE / unrar lt ARCHIVE   bare / technical listing (unrar's format: "Name:", "Type:", "Size:", ...)
unrar x ... ARCHIVE DEST/             extract
bsdtar -tvf ARCHIVE                   ls -l style listing (bsdtar's format)
bsdtar -xf ARCHIVE -C DEST            extract
Member names that end with ".symlink" (".hardlink") are a symbolic (hard) link named without that suffix, to
their content, as a malicious RAR could hold; the listings say so, as the real tools do. A name ending with
".encrypted" is listed as encrypted (unrar) and fails extraction. A name holding ".lie" is listed with size 0
and written slowly (a listing that lies). Extraction leaves "unrar-x-called" beside the archive when it
starts and "unrar-x-finished" when it ends."""
import os, sys, time, zipfile
bsdtar = os.path.basename(sys.argv[0]).startswith("bsdtar")
args = [a for a in sys.argv[1:] if not a.startswith("-")]
if bsdtar:
    cmd = "x" if "-xf" in sys.argv else "lv"
    archive, dest = args[0], (args[1] if len(args) > 1 else None)
else:
    cmd, archive, dest = args[0], args[1], (args[2] if len(args) > 2 else None)


def shown(name):
    for suffix in (".symlink", ".hardlink"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


try:
    zf = zipfile.ZipFile(archive)
except (OSError, zipfile.BadZipFile) as exc:
    print(f"{{archive}}: {{exc}}", file=sys.stderr)
    sys.exit(3)
with zf:
    infos = zf.infolist()
    if cmd == "lb":
        print("\\n".join(shown(i.filename) for i in infos))
    elif cmd == "lt":
        print("\\nUNRAR 6.21 freeware      Copyright (c) 1993-2023 Alexander Roshal\\n")
        print(f"Archive: {{archive}}\\nDetails: RAR 5")
        for i in infos:
            n = i.filename
            kind = ("Unix symbolic link" if n.endswith(".symlink") else "Hard link" if n.endswith(".hardlink")
                    else "Directory" if i.is_dir() else "File")
            print(f"\\n{{'Name':>12}}: {{shown(n)}}\\n{{'Type':>12}}: {{kind}}")
            if kind.endswith("link"):
                print(f"{{'Target':>12}}: {{zf.read(i).decode()}}")
            if not i.is_dir():
                size = 0 if ".lie" in n else i.file_size
                print(f"{{'Size':>12}}: {{size}}\\n{{'Packed size':>12}}: {{i.compress_size}}\\n{{'Ratio':>12}}: 100%")
            print(f"{{'Attributes':>12}}: {{'l' if n.endswith('.symlink') else 'd' if i.is_dir() else '-'}}rw-r--r--")
            print(f"{{'Host OS':>12}}: Unix\\n{{'Compression':>12}}: RAR 5.0(v50) -m3 -md=4M")
            if n.endswith(".encrypted"):
                print(f"{{'Flags':>12}}: encrypted ")
    elif cmd == "lv":
        for i in infos:
            n = i.filename
            mode = "l" if n.endswith(".symlink") else "h" if n.endswith(".hardlink") else "d" if i.is_dir() else "-"
            size = 0 if ".lie" in n or mode in "lh" else i.file_size
            target = zf.read(i).decode() if mode in "lh" else ""
            link = f" -> {{target}}" if mode == "l" else f" link to {{target}}" if mode == "h" else ""
            print(f"{{mode}}rw-r--r--  0 0      0      {{size:>8}} Jan  1  2016 {{shown(n)}}{{link}}")
    elif cmd == "x":
        here = os.path.dirname(os.path.abspath(archive))
        open(os.path.join(here, "unrar-x-called"), "w").close()
        for i in infos:
            n = i.filename
            path = os.path.join(dest, shown(n))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if n.endswith(".symlink"):
                os.symlink(zf.read(i).decode(), path)
            elif n.endswith(".hardlink"):
                os.link(os.path.join(dest, zf.read(i).decode()), path)
            elif n.endswith(".encrypted"):
                print(f"{{n}}: encrypted, a password is needed", file=sys.stderr)
                sys.exit(3)
            elif ".lie" in n:
                with zf.open(i) as src, open(path, "wb") as out:
                    while chunk := src.read(1 << 16):
                        out.write(chunk)
                        out.flush()
                        time.sleep(0.02)
            else:
                zf.extract(i, dest)
        open(os.path.join(here, "unrar-x-finished"), "w").close()
'''
FAKE_UNRAR = FAKE_RAR_TOOL  # the name older tests import


def fake_unrar(folder: Path, name: str = "unrar") -> Path:
    """Write the stand-in tool into `folder` as `name` ("unrar..." or "bsdtar...") and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / name
    tool.write_text(FAKE_RAR_TOOL.format(python=sys.executable))
    tool.chmod(0o755)
    return tool


def fake_bsdtar(folder: Path) -> Path:
    """The stand-in tool as bsdtar."""
    return fake_unrar(folder, "bsdtar")


def patch_zip_member(data: bytes, name: str, flag_bits: int = 0, method: int | None = None) -> bytes:
    """Zip bytes with member `name`'s general-purpose flags OR-ed with `flag_bits` and its compression method
    replaced, in its local header and its central directory entry alike (zipfile cannot write such members:
    it resets the encryption flag and knows only its own methods)."""
    out = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo(name)
        pos = zf.start_dir
    # central directory: "PK\1\2", flags at +8, method at +10, name length at +28, name at +46
    while out[pos : pos + 4] == b"PK\x01\x02":
        n, m, k = (int.from_bytes(out[pos + o : pos + o + 2], "little") for o in (28, 30, 32))
        if bytes(out[pos + 46 : pos + 46 + n]).decode() == name:
            _patch_header(out, pos + 8, flag_bits, method)
        pos += 46 + n + m + k
    _patch_header(out, info.header_offset + 6, flag_bits, method)  # local header: flags at +6, method at +8
    return bytes(out)


def _patch_header(buf: bytearray, flags_at: int, flag_bits: int, method: int | None) -> None:
    flags = int.from_bytes(buf[flags_at : flags_at + 2], "little") | flag_bits
    buf[flags_at : flags_at + 2] = flags.to_bytes(2, "little")
    if method is not None:
        buf[flags_at + 2 : flags_at + 4] = method.to_bytes(2, "little")
