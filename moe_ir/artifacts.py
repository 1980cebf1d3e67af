"""Writing outputs: every file moe-ir writes is staged, then swapped into place together, or not at all.

One mechanism for all writers (`moe-ir build` through every backend, `import-hf`, `export-hf`, single
files through `atomic_write`):

- Files are written into a private staging folder (`.moe-ir-stage-*`) inside the folder they will live
  in, so the final renames never cross a file system.
- `OutputFolder` (a build's `-o`) takes plain file names only: no '/', no '..', no absolute path, nothing
  that could resolve outside the folder, whatever a spec field says. `OutputFiles` takes the paths a user
  named on the command line (`import-hf -o SPEC --weights-out W`).
- On success every staged file replaces its destination: each old file is kept aside (a hard link, or a
  rename where links are not supported) until all new files are in, so a failure half-way puts every old
  file back. Ctrl-C during those few renames is held until they are done. Names the writer claimed but
  did not write this time (a previous build's `.onnx.data`, a stale engine) are removed in the same step.
- On any failure (an exception, Ctrl-C, a full disk) the staging folder is removed, folders the writer
  created are removed again, and nothing at the destination has changed.

What this cannot cover: a process killed outright (SIGKILL, power loss) may leave a `.moe-ir-stage-*`
folder behind; the destination files are then still either all old or, within the final renames, mixed.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import MoeIRError, OutputError, UsageError

__all__ = ["OutputFiles", "OutputFolder", "STAGE_PREFIX", "atomic_write", "check_file_name", "check_output_file",
           "check_output_folder"]

# Staging folders and the names a build may not use for its own files.
STAGE_PREFIX = ".moe-ir-stage-"
_RESERVED_PREFIX = ".moe-ir-"
_NAME_MAX = 255  # bytes in one file name on the file systems moe-ir targets (ext4, xfs, btrfs, tmpfs)
# Errors that are about writing whatever file they name: worth the writer's own message.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def check_file_name(name: object, where: str) -> str:
    """`name` as one plain file name inside a folder, or an OutputError: a build never writes through a
    name that has a folder part, climbs ('..'), is absolute, holds control characters, or takes one of the
    writer's own reserved names."""
    problem = None
    if not isinstance(name, str) or not name:
        problem = "it is empty" if name == "" else f"it is not a string ({type(name).__name__})"
    elif name in (".", ".."):
        problem = "it names a folder, not a file"
    elif os.path.isabs(name):
        problem = "it is an absolute path"
    elif "/" in name or "\\" in name:
        problem = "it has a folder part ('/' or '\\')"
    elif any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        problem = "it holds a control character"
    elif name.startswith(_RESERVED_PREFIX):
        problem = f"names starting with '{_RESERVED_PREFIX}' are the writer's own"
    elif len(name.encode("utf-8", "surrogateescape")) > _NAME_MAX:
        problem = f"it is longer than {_NAME_MAX} bytes"
    if problem:
        shown = repr(name)[:80]
        raise OutputError(f"{where}: refusing to write the file {shown}: {problem}; a build writes plain file "
                          "names inside its output folder (use a spec `name:` of letters, digits, '.', '_', '-')")
    return name  # type: ignore[return-value]


def _existing_ancestor(path: Path) -> Path:
    """The nearest of `path` and its parents that exists (or is a link)."""
    current = Path(os.path.abspath(path))
    while not os.path.lexists(current) and current.parent != current:
        current = current.parent
    return current


def _check_path_text(path: str | os.PathLike, flag: str) -> Path:
    text = os.fspath(path)
    if isinstance(text, bytes) or text == "":
        raise UsageError(f"{flag} is empty; give the path to write")
    if "\0" in text:
        raise UsageError(f"{flag} {text!r} holds a NUL character")
    return Path(text)


def _check_under_folders(path: Path, flag: str) -> None:
    """Every existing ancestor of `path` must be a folder, and the nearest one writable."""
    ancestor = _existing_ancestor(path.parent if path.parent != path else path)
    try:
        is_dir = ancestor.is_dir()
    except OSError as err:
        raise OutputError(f"{flag} {path}: cannot look at {ancestor} ({err.strerror})") from None
    if not is_dir:
        raise UsageError(f"{flag} {path} is under {ancestor}, which is a file, not a folder; choose a path in a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: the folder {ancestor} is not writable by this user (or is on a read-only "
                          "file system); choose a folder you can write")


def check_output_folder(path: str | os.PathLike, flag: str = "-o") -> Path:
    """Refuse, before any work and without changing anything, an output folder that cannot be one: an
    existing file (or a link to one, or a dangling link), a path under a file, a folder this user cannot
    write. A missing folder is fine (it is created when the output is committed)."""
    path = _check_path_text(path, flag)
    try:
        exists, is_link = path.exists(), path.is_symlink()
    except OSError as err:  # a name too long, a loop of links
        raise UsageError(f"{flag} {path}: not a usable path ({err.strerror})") from None
    if exists and not path.is_dir():
        raise UsageError(f"{flag} {path} is an existing file; {flag} names the output folder (a new or existing "
                         "folder)")
    if is_link and not exists:
        raise UsageError(f"{flag} {path} is a link to nothing; remove it or choose another folder")
    if exists:
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputError(f"{flag} {path}: the folder is not writable by this user (or is on a read-only file "
                              "system); choose a folder you can write")
        return path
    _check_under_folders(path, flag)
    return path


def check_output_file(path: str | os.PathLike, flag: str = "-o") -> Path:
    """Refuse an output file path that cannot be one: an existing folder, a path under a file, an
    unwritable folder."""
    path = _check_path_text(path, flag)
    try:
        is_dir = path.is_dir() and not path.is_symlink()
    except OSError as err:
        raise UsageError(f"{flag} {path}: not a usable path ({err.strerror})") from None
    if is_dir or os.fspath(path).endswith(os.sep):
        raise UsageError(f"{flag} {path} is a folder; {flag} names a file to write")
    _check_under_folders(path, flag)
    return path


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C for the few renames of a commit, then deliver it: a commit is never cut half-way. Only the
    main thread can change signal handlers; elsewhere the commit's own rollback is the guard."""
    previous = signal.getsignal(signal.SIGINT)
    # None: a handler installed outside Python, which cannot be put back from here.
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            signal.raise_signal(signal.SIGINT)


class _Entry:
    __slots__ = ("final", "staged", "required", "backup", "moved_in")

    def __init__(self, final: Path, staged: Path, required: bool):
        self.final, self.staged, self.required = final, staged, required
        self.backup: Path | None = None
        self.moved_in = False


class _StagedOutputs:
    """Files staged beside their destinations and swapped in together (see the module docstring). Use as
    a context manager: a clean exit commits, an exception discards."""

    def __init__(self, what: str):
        self.what = what
        self._stages: dict[str, Path] = {}  # real path of a destination folder -> its staging folder
        self._entries: dict[str, _Entry] = {}  # real path of a destination file -> entry
        self._created: list[Path] = []  # folders this writer made, outermost first
        self._backups: dict[Path, Path] = {}  # staging folder -> the folder holding old files during a commit
        self._closed = False

    # -- staging

    def _make_folder(self, folder: Path) -> None:
        missing = []
        current = Path(os.path.abspath(folder))
        while not os.path.lexists(current):
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            os.mkdir(path)
            self._created.append(path)

    def _stage_for(self, folder: Path) -> Path:
        key = os.path.realpath(folder)
        if key not in self._stages:
            self._make_folder(folder)
            self._stages[key] = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=folder))
        return self._stages[key]

    def _add(self, final: Path, required: bool) -> Path:
        if self._closed:
            raise OutputError(f"{self.what}: {final} added after the output was committed or discarded")
        self._check_not_a_folder(final)  # now, before the file is written (commit checks again)
        try:
            stage = self._stage_for(final.parent)
        except OSError as err:
            raise self._describe(err) from None
        key = os.path.join(os.path.realpath(final.parent), final.name)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(final, stage / final.name, required)
        entry.required = entry.required or required
        return entry.staged

    # -- the swap

    def commit(self) -> list[Path]:
        """Swap every staged file in (and remove claimed names that were not written); return the final
        paths written. On failure every destination is put back as it was and the error is raised."""
        if self._closed:
            raise OutputError(f"{self.what}: the output was already committed or discarded")
        entries = list(self._entries.values())
        for entry in entries:  # checked before anything changes
            written = self._is_file(entry.staged)
            if entry.required and not written:
                raise OutputError(f"{self.what}: {entry.final.name} was not written; nothing was changed")
            self._check_not_a_folder(entry.final)
        touched: list[_Entry] = []
        with _interrupts_held():
            try:
                for entry in entries:
                    written = self._is_file(entry.staged)
                    if os.path.lexists(entry.final):
                        entry.backup = self._backup_path(entry)
                        if written:
                            # A hard link keeps the old file readable at its name until the new one replaces it.
                            try:
                                os.link(entry.final, entry.backup, follow_symlinks=False)
                            except OSError:
                                os.rename(entry.final, entry.backup)
                        else:
                            os.rename(entry.final, entry.backup)
                    touched.append(entry)
                    if written:
                        os.replace(entry.staged, entry.final)
                        entry.moved_in = True
            except BaseException:
                self._roll_back(touched)
                raise
            # Done before a held Ctrl-C is delivered, so that it finds the output complete and tidy.
            self._closed = True
            self._remove_stages()
        return [e.final for e in entries if e.moved_in]

    def _check_not_a_folder(self, final: Path) -> None:
        if final.is_dir() and not final.is_symlink():
            raise OutputError(f"{final} is a folder where the {self.what} writes a file; move it away or choose "
                              "another output location; nothing was changed")

    @staticmethod
    def _is_file(path: Path) -> bool:
        try:
            return stat.S_ISREG(os.lstat(path).st_mode)
        except OSError:
            return False

    def _backup_path(self, entry: _Entry) -> Path:
        """Where the old file at entry.final waits until the commit is done: a folder inside the staging folder
        (same file system, removed with it), made on first use so it cannot take a staged file's name."""
        stage = entry.staged.parent
        holder = self._backups.get(stage)
        if holder is None:
            holder = self._backups[stage] = Path(tempfile.mkdtemp(prefix=".old-", dir=stage))
        return holder / entry.final.name

    def _roll_back(self, touched: list[_Entry]) -> None:
        for entry in reversed(touched):
            try:
                if entry.backup is not None and os.path.lexists(entry.backup):
                    os.replace(entry.backup, entry.final)
                elif entry.moved_in:
                    os.unlink(entry.final)
            except OSError:
                pass  # best effort: the other entries still go back

    def discard(self) -> None:
        """Remove everything staged and every folder this writer created; the destinations are unchanged."""
        if self._closed:
            return
        self._closed = True
        self._remove_stages()
        for folder in reversed(self._created):
            try:
                os.rmdir(folder)
            except OSError:
                break  # not empty any more (someone else wrote there): leave it and its parents

    def _remove_stages(self) -> None:
        for stage in self._stages.values():
            shutil.rmtree(stage, ignore_errors=True)

    # -- errors

    def _is_ours(self, name: str) -> bool:
        """Whether a path an OSError names is one this writer writes (a staging folder, a destination, a
        folder it creates)."""
        target = os.path.abspath(name)
        places = [*self._stages.values(), *self._created, *(e.final for e in self._entries.values())]
        for place in map(os.path.abspath, places):
            try:
                if os.path.commonpath([target, place]) == place:
                    return True
            except ValueError:
                continue
        return False

    def _describe(self, err: OSError) -> MoeIRError | OSError:
        """An OSError about writing one of this writer's paths (or a full disk) as one clear line; any other
        (reading an input, say) is left as it is."""
        names = [os.fspath(n) for n in (err.filename, err.filename2) if isinstance(n, (str, os.PathLike))]
        if err.errno not in _WRITE_ERRNOS and not any(self._is_ours(n) for n in names):
            return err
        reason = err.strerror or str(err)
        hint = "; free some space and run it again" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        return OutputError(f"{self.what}: could not write {self._destination()} ({reason}); nothing there was "
                           f"changed{hint}")

    def _destination(self) -> str:
        return ", ".join(sorted({os.fspath(e.final) for e in self._entries.values()})) or "the output"

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                self.commit()
            except OSError as err:
                self.discard()
                raise self._describe(err) from None
            except BaseException:
                self.discard()
                raise
            return False
        self.discard()
        if isinstance(exc, OSError):
            described = self._describe(exc)
            if described is not exc:
                raise described from None
        return False


class OutputFolder(_StagedOutputs):
    """A build's output folder (`-o`): `path(name)` is where a file the build writes is staged,
    `claim(name)` a name it may write (else a file of that name from an earlier build is removed),
    `final(name)` where the file will be. Names are plain file names (check_file_name).

        with OutputFolder(out_dir, what="onnx build") as out:
            write_model(..., out.path("layer.portable.onnx"))
            out.claim("layer.portable.onnx.data")

    Other files in the folder are left as they are."""

    def __init__(self, folder: str | os.PathLike, *, what: str = "build"):
        super().__init__(what)
        self.folder = check_output_folder(folder)
        try:
            self._stage = self._stage_for(self.folder)
        except OSError as err:
            self.discard()
            raise OutputError(f"{what}: cannot write the output folder {self.folder} ({err.strerror}); choose a "
                              "folder you can write") from None

    def final(self, name: str) -> Path:
        return self.folder / check_file_name(name, f"{self.what} into {self.folder}")

    def path(self, name: str) -> Path:
        """The staging path of a file the build writes (it must exist when the output is committed)."""
        return self._add(self.final(name), required=True)

    def claim(self, name: str) -> Path:
        """The staging path of a file the build may write; if it does not, a file of that name in the folder
        (from an earlier build) is removed when the output is committed."""
        return self._add(self.final(name), required=False)

    def _destination(self) -> str:
        return str(self.folder)


class OutputFiles(_StagedOutputs):
    """Files at paths a user named (`import-hf -o SPEC.yaml --weights-out W.safetensors`), written as one
    set: `path(destination)` is where to write each; they replace their destinations together."""

    def path(self, destination: str | os.PathLike, flag: str = "output file") -> Path:
        final = check_output_file(destination, flag)
        key = os.path.join(os.path.realpath(final.parent), final.name)
        if key in self._entries:
            raise UsageError(f"{flag} {final} is also another output of this command; give each output its own path")
        return self._add(final, required=True)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call write(staged_path) and put the file at `path` only if it returns: one file through the same
    staging and swap as every other output (nothing is left at `path` on failure)."""
    with OutputFiles("write") as out:
        staged = out.path(path)
        write(str(staged))
        # Some writers create their file 0600 (safetensors does); give it the mode a plain open() would.
        if os.path.isfile(staged):
            os.chmod(staged, 0o666 & ~_umask())
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
