"""Checks on artifacts that moe-ir reads back from disk, before any loader sees them.

Two kinds of file come back: data (ONNX models and their external weights) and code (AOTInductor `.pt2`
packages, whose shared library runs when torch loads them; TensorRT bundles, whose plugin module is
Python). Neither can be made safe to load from an untrusted source by checking it; what these checks give
is confinement (a file named by an artifact stays inside the artifact's folder and is a plain file, so an
ONNX file cannot pull `/proc/self/environ` or `../secret` into its outputs) and integrity (a package whose
bytes changed since moe-ir built it is refused with one clear error instead of crashing the process that
loads it).

Nothing here opens a file it refuses: special files are judged by `os.stat`, so a FIFO cannot block.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

from moe_ir.errors import BackendError

_CHUNK = 1 << 20
# A manifest lists file names and digests: anything larger than this is not one of ours.
MANIFEST_MAX_BYTES = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (the files are up to tens of GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def regular_file(path: str | Path, what: str) -> os.stat_result:
    """stat of `path` (after symlinks), which must be an existing regular file; `what` names it in errors."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise BackendError(f"{what}: {path} does not exist") from None
    except OSError as err:
        raise BackendError(f"{what}: cannot stat {path} ({err.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise BackendError(f"{what}: {path} is {_kind(info.st_mode)}, not a regular file; refusing to read it")
    return info


def location_problem(location: str) -> str:
    """Why a relative file location written inside an artifact is refused on its face ('' if it is not):
    empty, absolute (POSIX, UNC or a drive letter), or climbing with `..`. Judged on the text alone, before
    any path is built from it."""
    if not location or "\0" in location:
        return "it is empty" if not location else "it contains a NUL byte"
    parts = location.replace("\\", "/").split("/")
    if location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        return "it is an absolute path"
    if ".." in parts:
        return "it contains '..'"
    return ""


def confined_file(folder: str | Path, location: str, what: str) -> tuple[Path, os.stat_result]:
    """The regular file that `location` (relative, as written inside an artifact) names inside `folder`,
    with its stat. Refused with a BackendError naming `what` and the location: absolute locations, `..`,
    anything that resolves (after symlinks) outside `folder`, and special files (FIFOs, devices, sockets,
    directories). Nothing is opened."""
    problem = location_problem(location)
    if problem:
        raise BackendError(f"{what}: location '{location}' is refused because {problem}; files an artifact names "
                           f"must lie inside its folder")
    root = Path(os.path.realpath(folder))
    target = Path(os.path.realpath(root / location))
    if target != root and root not in target.parents:
        raise BackendError(f"{what}: location '{location}' resolves to {target}, outside the artifact's folder "
                           f"{root} (a symlink leading out?); refusing to read it")
    info = regular_file(target, f"{what} (location '{location}')")
    return target, info


def check_digests(folder: str | Path, expected: Mapping[str, str], where: str) -> None:
    """Each file named in `expected` (relative to `folder`, confined to it) has the given sha256."""
    for name, digest in expected.items():
        path, _ = confined_file(folder, name, where)
        actual = sha256_file(path)
        if actual != digest:
            raise BackendError(f"{where}: {name} has sha256 {actual[:16]}..., the manifest records "
                               f"{str(digest)[:16]}...: the file changed since moe-ir wrote it (damaged or "
                               f"edited); rebuild it")


# ------------------------------------------------------------------------------------------------
# zip archives that carry their own manifest (AOTInductor .pt2 packages)


def _member_problem(name: str) -> str:
    problem = location_problem(name)
    if problem:
        return problem
    if "\\" in name:
        return "it contains a backslash"
    if any(part in ("", ".") for part in name.rstrip("/").split("/")):
        return "it has an empty or '.' component"
    return ""


def archive_members(path: str | Path, what: str) -> tuple[zipfile.ZipFile, str, dict[str, zipfile.ZipInfo]]:
    """Open a zip archive whose members all sit under one root folder (torch's layout) and check every
    member name: relative, no `..`, no backslash, no duplicates, no symlinks, no encryption. Returns the
    open archive, the root folder's name and the members by name below the root. Raises BackendError."""
    regular_file(path, what)
    try:
        archive = zipfile.ZipFile(path)
        infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as err:
        raise BackendError(f"{what}: {path} is not a readable zip archive ({err}); it is damaged or not a package "
                           f"moe-ir wrote: rebuild it") from None
    try:
        roots = set()
        members: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            problem = _member_problem(info.filename)
            if problem:
                raise BackendError(f"{what}: archive member '{info.filename}' is refused because {problem}")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise BackendError(f"{what}: archive member '{info.filename}' is a symlink")
            if info.flag_bits & 0x1:
                raise BackendError(f"{what}: archive member '{info.filename}' is encrypted")
            root, _, rest = info.filename.partition("/")
            roots.add(root)
            if info.is_dir():
                continue
            if not rest:
                raise BackendError(f"{what}: archive member '{info.filename}' is not inside the package's root folder")
            if rest in members:
                raise BackendError(f"{what}: archive member '{info.filename}' appears twice")
            members[rest] = info
        if len(roots) != 1:
            raise BackendError(f"{what}: archive members lie under {len(roots)} root folders "
                               f"({', '.join(sorted(roots)[:4])}); a package has one")
    except BackendError:
        archive.close()
        raise
    return archive, roots.pop(), members


def _member_digest(archive: zipfile.ZipFile, info: zipfile.ZipInfo, what: str) -> str:
    digest = hashlib.sha256()
    try:
        with archive.open(info) as f:  # zipfile checks the member's CRC-32 at its end
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                digest.update(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as err:
        raise BackendError(f"{what}: archive member '{info.filename}' cannot be read ({err}); the package is "
                           f"damaged: rebuild it") from None
    return digest.hexdigest()


def append_manifest(path: str | Path, manifest_member: str, extra: Mapping[str, object] | None = None) -> dict:
    """Add `<root>/<manifest_member>` to the zip at `path`: the sha256 and size of every other member, so a
    loader can check the package before handing it to code that would crash on damaged bytes. Returns the
    manifest."""
    with zipfile.ZipFile(path) as archive:
        root = archive.infolist()[0].filename.partition("/")[0]
        files = {}
        for info in archive.infolist():
            if info.is_dir():
                continue
            files[info.filename.partition("/")[2]] = {"sha256": _member_digest(archive, info, str(path)),
                                                      "bytes": info.file_size}
    manifest = {"format": 1, "producer": "moe-ir", **(extra or {}), "members": files}
    with zipfile.ZipFile(path, "a") as archive:
        entry = zipfile.ZipInfo(f"{root}/{manifest_member}", date_time=(1980, 1, 1, 0, 0, 0))
        entry.external_attr = 0o644 << 16
        archive.writestr(entry, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def verify_archive(path: str | Path, manifest_member: str, what: str, *, required: Iterable[str] = (),
                   allowed_prefixes: Iterable[str] = (), allow_unverified: bool = False) -> dict | None:
    """Check a zip package before it is loaded: member names (archive_members), the expected layout
    (`required` members present; every member under one of `allowed_prefixes`), then the manifest: exactly
    its members, each with its recorded size and sha256. Returns the manifest (None for a package without
    one, accepted only with `allow_unverified`). Raises BackendError naming what is wrong."""
    archive, _, members = archive_members(path, what)
    with archive:
        prefixes = tuple(allowed_prefixes)
        for name in members:
            if prefixes and not name.startswith(prefixes) and name != manifest_member:
                raise BackendError(f"{what}: unexpected archive member '{name}' (a package holds only "
                                   f"{', '.join(p.rstrip('/') for p in prefixes)})")
        for name in required:
            if not any(m == name or m.startswith(name) for m in members):
                raise BackendError(f"{what}: the archive has no '{name}'; it is not a complete package")
        if manifest_member not in members:
            if allow_unverified:
                return None
            raise BackendError(f"{what}: the package has no moe-ir manifest ({manifest_member}), so its contents "
                               f"cannot be checked; rebuild it with moe-ir, or load it with allow_unverified=True "
                               f"only if you trust where it came from (loading it runs its code)")
        info = members.pop(manifest_member)
        if info.file_size > MANIFEST_MAX_BYTES:
            raise BackendError(f"{what}: its manifest is {info.file_size} bytes, more than a manifest holds")
        try:
            manifest = json.loads(io.TextIOWrapper(archive.open(info), encoding="utf-8").read())
            recorded = manifest["members"]
            valid = isinstance(recorded, dict) and all(
                isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
                for v in recorded.values())
        except (ValueError, KeyError, TypeError, zipfile.BadZipFile, OSError, EOFError):
            valid = False
        if not valid:
            raise BackendError(f"{what}: its manifest ({manifest_member}) is not valid moe-ir manifest JSON; the "
                               f"package is damaged: rebuild it")
        added = sorted(set(members) - set(recorded))
        missing = sorted(set(recorded) - set(members))
        if added or missing:
            said = "; ".join(part for part in (
                f"members not in its manifest: {', '.join(added[:5])}" if added else "",
                f"members missing: {', '.join(missing[:5])}" if missing else "") if part)
            raise BackendError(f"{what}: the archive does not match its manifest ({said}); it was changed after "
                               f"moe-ir built it: rebuild it")
        for name, info in members.items():
            expect = recorded[name]
            if info.file_size != expect["bytes"]:
                raise BackendError(f"{what}: member '{name}' is {info.file_size} bytes, its manifest records "
                                   f"{expect['bytes']}; the package is damaged: rebuild it")
            actual = _member_digest(archive, info, what)
            if actual != expect["sha256"]:
                raise BackendError(f"{what}: member '{name}' fails its sha256 check (the package's bytes changed "
                                   f"since moe-ir built it); rebuild it")
    return manifest
