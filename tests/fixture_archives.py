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
    """{file name: bytes} of SYNTHIA's one archive; zip bytes under the .rar name, for the stand-in unrar."""
    root = work / "synthia-src"
    write_synthia(root / "RAND_CITYSCAPES", n)
    return {"SYNTHIA_RAND_CITYSCAPES.rar": zip_tree(root)}


def write_sources(path: Path, datasets: dict[str, dict]) -> Path:
    """Write a sources file in plca/data/sources.yaml's schema."""
    path.write_text(yaml.safe_dump({"version": 1, "datasets": datasets}, sort_keys=False))
    return path


FAKE_UNRAR = '''#!{python}
"""Stand-in for unrar (the real one cannot be installed here): reads a zip under a .rar name.

lb ARCHIVE      prints member names; x ... ARCHIVE DEST/ extracts them. A member whose name ends with
".symlink" is extracted as a symbolic link to its content (as a malicious RAR could hold)."""
import os, sys, zipfile
args = [a for a in sys.argv[1:] if not a.startswith("-")]
cmd, archive = args[0], args[1]
with zipfile.ZipFile(archive) as zf:
    if cmd == "lb":
        print("\\n".join(zf.namelist()))
    elif cmd == "x":
        dest = args[2]
        open(os.path.join(os.path.dirname(archive), "unrar-x-called"), "w").close()
        for info in zf.infolist():
            if info.filename.endswith(".symlink"):
                link = os.path.join(dest, info.filename[: -len(".symlink")])
                os.makedirs(os.path.dirname(link), exist_ok=True)
                os.symlink(zf.read(info).decode(), link)
            else:
                zf.extract(info, dest)
'''


def fake_unrar(folder: Path) -> Path:
    """Write the stand-in unrar into `folder` and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / "unrar"
    tool.write_text(FAKE_UNRAR.format(python=sys.executable))
    tool.chmod(0o755)
    return tool
