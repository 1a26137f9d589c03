"""The file:// and pvc:// backend: a store that is a local folder (single files replaced atomically by
write + rename), plus the local-file helpers the download cache shares."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Optional

from .errors import NEARBY_MAX
from .uris import COMPLETE


def local_nearby(p: Path) -> str:
    """'<nearest existing ancestor> holds: [...]' for a missing local path."""
    anc = p.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    try:
        names = sorted(x.name + ("/" if x.is_dir() else "") for x in anc.iterdir())
    except OSError:
        return f"{anc} is not readable"
    shown = names[:NEARBY_MAX] + (["..."] if len(names) > NEARBY_MAX else [])
    return f"{anc} holds: {shown or 'nothing'}"


def walk_files(root: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every regular file below root, sorted."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if p.is_file():
                out.append((p.relative_to(root).as_posix(), p))
    return sorted(out)


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class LocalBackend:
    """file:// and pvc:// stores: a folder. Single files are replaced atomically (write + rename)."""

    def __init__(self, root: Path):
        self.root = root

    def _p(self, key: str) -> Path:
        return self.root / key if key else self.root

    def put_file(self, local: Path, key: str) -> None:
        dest = self._p(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        shutil.copyfile(local, tmp)
        os.replace(tmp, dest)

    def write_bytes(self, key: str, data: bytes) -> None:
        atomic_write(self._p(key), data)

    def read_bytes(self, key: str) -> Optional[bytes]:
        p = self._p(key)
        return p.read_bytes() if p.is_file() else None

    def is_object(self, key: str) -> bool:
        return self._p(key).is_file()

    def list_files(self, key: str) -> dict[str, int]:
        p = self._p(key)
        return {rel: f.stat().st_size for rel, f in walk_files(p)} if p.is_dir() else {}

    def list_children(self, key: str) -> list[str]:
        p = self._p(key)
        return sorted(x.name for x in p.iterdir() if x.is_dir()) if p.is_dir() else []

    def delete_tree(self, key: str) -> None:
        p = self._p(key)
        if p.is_dir():
            (p / COMPLETE).unlink(missing_ok=True)  # the marker goes first: a reader never trusts a half-deleted folder
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

    def move_tree(self, src: str, dst: str) -> None:
        d = self._p(dst)
        d.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._p(src), d)  # one rename: atomic on a POSIX filesystem

    def download(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._p(key), dest)
