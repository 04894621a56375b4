# Atomic writes shared by every command that leaves a result: JSON files (eval summaries, bench tables, training data),
# and whole folders (model folders, checkpoints, caches) built in a staging folder and renamed into place. A reader or
# a killed run never sees half a result, and no command deletes a file it did not write.
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

# Read once, at import: os.umask can only be read by setting it, which would race with other threads' file creation.
_UMASK = os.umask(0)
os.umask(_UMASK)

STAGING_SUFFIX = ".tmp"  # .{name}.{pid}.{random}.tmp: a folder or file being written beside its target
OLD_MARKER = ".old-"  # .{name}.old-{pid}: the previous version, between the two renames of a folder swap


class OutputError(ValueError):
    """The place a command was asked to write cannot be used (a file where a folder should be, a folder holding
    someone else's files, no permission). The message names the path and what to do."""


def staging_dir(target: Path) -> Path:
    """A new empty folder beside `target`, to be renamed onto it when complete. It gets an ordinary folder's
    permissions (the umask's): mkdtemp's 0700 would make a model folder or cache private once renamed. The pid in
    its name lets a later run tell a dead writer's leftovers from a live one's."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=STAGING_SUFFIX, dir=target.parent))
    except PermissionError:
        raise OutputError(f"{target}: cannot write there (permission denied on {target.parent})") from None
    except (NotADirectoryError, FileExistsError):
        raise OutputError(f"{target}: cannot write there ({target.parent} is not a folder)") from None
    tmp.chmod(0o777 & ~_UMASK)
    return tmp


def readable(path: str | os.PathLike) -> None:
    """An ordinary file's permissions (the umask's): mkstemp and safetensors' writer both create files 0600, which
    would make exported weights or an eval summary unreadable by anyone else on a shared machine."""
    os.chmod(path, 0o666 & ~_UMASK)


def save_weights(state: dict, path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """A state dict as safetensors, with an ordinary file's permissions."""
    from safetensors.torch import save_file  # safetensors imports torch; this module stays light for the CLI

    save_file({k: v.detach().contiguous() for k, v in state.items()}, path, metadata=metadata)
    readable(path)


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside `path` to write; flushed to disk and renamed onto `path` with an ordinary file's
    permissions when the block finishes, deleted if it raises. An interrupted write leaves the previous version (or
    nothing), never a truncated file that reads as done."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=STAGING_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        readable(tmp)
        _fsync(Path(tmp))
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data, *, indent: int = 2) -> None:
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent, ensure_ascii=False)
        f.write("\n")


# --- whole folders ---------------------------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    """Flush a file or a folder's entries to disk, so a rename that follows cannot be seen before the data it names."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # some file systems refuse to open folders; the rename is then as durable as they make it
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def replace_dir(staged: Path, target: Path) -> None:
    """Put the finished folder `staged` at `target` with renames only, after flushing it to disk; a previous `target`
    is renamed aside first and deleted last. A kill between the two renames leaves `.{name}.old-{pid}`, which the
    next write to `target` (clean_stale) renames back if nothing replaced it."""
    staged, target = Path(staged), Path(target)
    fsync_tree(staged)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}{OLD_MARKER}{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staged, target)
    _fsync(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(target: Path) -> list[Path]:
    """Remove what killed writers of `target` left beside it (staging folders and files of processes that no longer
    run), and put a previous version back if a kill fell between the two renames of replace_dir. Returns what was
    removed."""
    return clean_stale_in(Path(target).parent, Path(target).name)


def clean_stale_in(folder: Path, name: str | None = None) -> list[Path]:
    """clean_stale for every target in `folder` (name None), or for the one called `name`."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    # mkdtemp / mkstemp add 8 characters of [a-z0-9_]; a stricter match than a prefix, so that writers of another
    # target whose name merely starts the same ("model" and "model.5") are never taken for ours
    target = re.escape(name) if name is not None else r".+?"
    staging = re.compile(rf"\.({target})\.(\d+)\.[a-z0-9_]{{8}}{re.escape(STAGING_SUFFIX)}")
    old_version = re.compile(rf"\.({target}){re.escape(OLD_MARKER)}(\d+)")
    removed = []
    for entry in folder.iterdir():
        if (match := old_version.fullmatch(entry.name)) and not _pid_alive(int(match[2])):
            original = folder / match[1]
            if not original.exists():
                os.replace(entry, original)  # the kill came after the old version moved aside: restore it
                continue
        elif not ((match := staging.fullmatch(entry.name)) and not _pid_alive(int(match[2]))):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def foreign_entries(target: Path, is_ours: Callable[[str], bool]) -> list[str]:
    """Names in the folder `target` that a writer of this kind of folder does not write."""
    return sorted(e.name for e in Path(target).iterdir() if not is_ours(e.name)) if Path(target).is_dir() else []


def check_output_dir(target: str | os.PathLike, is_ours: Callable[[str], bool], *, overwrite: bool = False,
                     what: str = "folder", flag: str = "--overwrite") -> list[str]:
    """writing_dir's checks alone, for commands that should fail before hours of work rather than at the end.
    Returns the foreign entries that `overwrite` accepted."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: is a file, not a {what}; give a folder path")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{target}: cannot write there ({parent} is a file)")
            if not os.access(parent, os.W_OK | os.X_OK):  # the staging folder is made beside the target
                raise OutputError(f"{target}: cannot write there (permission denied on {parent})")
            break
    foreign = foreign_entries(target, is_ours)
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(f"{target}: holds files this command did not write ({shown}); refusing to write a {what} "
                          f"there. Choose an empty or new folder, or pass {flag} to write into it (those files are "
                          "kept)")
    return foreign


@contextmanager
def writing_dir(target: str | os.PathLike, is_ours: Callable[[str], bool], *, overwrite: bool = False,
                what: str = "folder", marker: str | None = None, flag: str = "--overwrite") -> Iterator[Path]:
    """Yield an empty staging folder to fill; when the block finishes it becomes `target`.

    The one way every command writes a folder (model folders, converted checkpoints, caches, training checkpoints):
    - `target` absent, empty or holding only entries `is_ours` accepts: the staged folder replaces it (replace_dir).
    - `target` holding anything else (a photo, notes, another program's files): refused, naming those entries,
      unless `overwrite`; then our entries are replaced one by one, `marker` (the file whose presence marks a
      complete folder, e.g. config.json) removed first and written last, and the foreign entries are left alone.
    - a file at `target`, or no permission: OutputError naming it. If the block raises, the staged folder is deleted
      and `target` is as it was."""
    target = Path(target)
    foreign = check_output_dir(target, is_ours, overwrite=overwrite, what=what, flag=flag)
    clean_stale(target)
    staged = staging_dir(target)
    try:
        yield staged
        if foreign:
            _merge_into(staged, target, is_ours, marker)
        else:
            replace_dir(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def _merge_into(staged: Path, target: Path, is_ours: Callable[[str], bool], marker: str | None) -> None:
    """Our entries of `target` replaced by the staged ones, foreign entries untouched (writing_dir with overwrite)."""
    fsync_tree(staged)
    if marker is not None:
        (target / marker).unlink(missing_ok=True)  # from here until the end the folder does not look complete
    new = {e.name for e in staged.iterdir()}
    for entry in target.iterdir():
        if is_ours(entry.name) and entry.name not in new:  # ours, from the previous version, not written again
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    for name in sorted(new, key=lambda n: n == marker):  # the marker last
        source, dest = staged / name, target / name
        if source.is_dir():
            replace_dir(source, dest)
        else:
            os.replace(source, dest)
    _fsync(target)
    shutil.rmtree(staged, ignore_errors=True)
