"""How acip writes: a file is either the old or the new one, a folder is replaced only by a complete new folder,
swapped in at once, and only where acip wrote the old one; one process at a time writes an output.

A file goes to a temporary sibling, is flushed to the disk (fsync), renamed over the target, and the folder holding
it is flushed too, so that the rename itself survives a power loss (:func:`write_atomically`).

A command's output (a folder, or one file such as a ``.pt2`` package) is written inside :func:`replacing`: the
output-folder protocol, the same for the ACIP run, fine-tuning, export and packages. It refuses at once an output
another process is writing, puts right what killed processes left, checks the output may be written (twice: before
the lock, so that a refusal writes nothing, and under it), holds the lock, and gives a stage beside the output that
is swapped in when complete.

For an output ``runs/demo`` acip uses these siblings (hidden names next to it, never inside it):

* ``runs/.demo.acip-lock``: the lock file. One process at a time holds it (an OS file lock, :func:`folder_lock`);
  it records the holder's pid, command and start time for the message another process gets.
* ``runs/.demo.acip-new``: a run started with ``--overwrite`` while ``runs/demo`` holds a previous result lives here
  (record, log, checkpoints) until it is complete; ``--resume`` finds it here (acip.runs).
* ``runs/.demo.acip-save``: the stage of a final save or an export: written completely, flushed, then swapped with
  ``runs/demo`` (:func:`replace_folder`); afterwards it holds the previous contents, which are removed. The stage of
  a file ``m.pt2`` is ``.m.pt2.acip-save.pt2`` (renamed over the file).
* ``runs/.demo.acip-old``: only where the filesystem cannot swap two folders at once (see :func:`replace_folder`).

Whatever a killed process leaves of these is put right by the next acip command on the same output
(:func:`recover`).
"""

import ctypes
import errno
import json
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from .records import KINDS, foreign_files, read_record

LOCK, NEW, STAGE, OLD = "acip-lock", "acip-new", "acip-save", "acip-old"
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100  # linux/fs.h, fcntl.h
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock; the message names it (pid, command, start time)."""


# -- files -----------------------------------------------------------------------------------------------------------


def fsync_path(path: str | os.PathLike) -> None:
    """Flush one file or folder to the disk (folders: their entries, i.e. renames and new files in them)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # some platforms (Windows) cannot open folders; their renames are durable as far as they go
        return
    try:
        os.fsync(fd)
    except OSError:  # a folder on a filesystem without fsync for directories
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file and folder under ``folder`` (and ``folder`` itself) to the disk."""
    for root, _, names in os.walk(folder):
        for name in names:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def tree_files(folder: str | os.PathLike) -> list[str]:
    """The files under ``folder``, as sorted relative POSIX paths."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def write_atomically(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write text or bytes to ``path`` through a flushed temporary sibling and a rename; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The pid keeps concurrent writers (e.g. two first-time corpus extractions) from sharing a temporary file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        if not isinstance(data, (str, bytes)):
            raise TypeError(f"data must be str or bytes, got {type(data).__name__}")
        with open(tmp, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def write_json(path: str | os.PathLike, data) -> Path:
    """Write JSON atomically, indented for people to read."""
    return write_atomically(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, records) -> Path:
    """Write one JSON record per line atomically."""
    return write_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# -- folders ---------------------------------------------------------------------------------------------------------


def sibling(folder: str | os.PathLike, what: str) -> Path:
    """The hidden sibling ``.NAME.WHAT`` of ``folder`` (see the module's docstring)."""
    folder = Path(os.path.abspath(folder))
    return folder.parent / f".{folder.name}.{what}"


def check_output_dir(out, inputs: dict[str, str], name: str = "output_dir") -> Path:
    """``out`` as a Path, or an error naming ``name`` when acip must not write there: the filesystem root, the
    current folder or home (or a folder holding them), a file, or a folder equal to, inside or holding an input
    (``inputs``: argument name -> local path)."""
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise ValueError(f"{name} must be a folder path, got {out!r}")
    real = Path(os.path.realpath(out))
    if real == Path(real.anchor):
        raise ValueError(f"{name} must be a folder of its own, not the filesystem root")
    try:
        home = Path.home().resolve()
    except RuntimeError:  # no home folder known
        home = None
    for place, label in ((Path.cwd().resolve(), "the current folder"), (home, "your home folder")):
        if place is not None and (real == place or real in place.parents):
            raise ValueError(
                f"{name} must be a folder of its own, not {label} ({place}) or a folder holding it: acip replaces "
                "its output folder as a whole"
            )
    if real.exists() and not real.is_dir():
        raise NotADirectoryError(f"{name} must be a folder, but {out} is a file")
    for input_name, path in inputs.items():
        source = Path(os.path.realpath(path))
        if real == source:
            raise ValueError(f"{name} must differ from {input_name} ({path}): the output is a new folder")
        if source in real.parents:
            raise ValueError(f"{name} must not be inside {input_name} ({path})")
        if real in source.parents:
            raise ValueError(f"{name} must not hold {input_name} ({path}): replacing it would delete the input")
    return Path(out)


def _holder() -> str:
    """This process, as the lock file records it."""
    command = " ".join([Path(sys.argv[0]).name or "python", *sys.argv[1:]]) if sys.argv else "python"
    return json.dumps({"pid": os.getpid(), "command": command, "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")})  # fmt: skip


def _busy(folder: Path, path: Path, name: str) -> FolderBusy:
    """The error for a folder whose lock another process holds, naming that process."""
    holder = {}
    for _ in range(20):  # the holder writes its name right after taking the lock
        try:
            holder = json.loads(path.read_text())
            break
        except (OSError, ValueError):
            time.sleep(0.05)
    who = (f"process {holder.get('pid')} on {holder.get('host')} (`{holder.get('command')}`, started "
           f"{holder.get('started')})") if holder else "another process"  # fmt: skip
    return FolderBusy(
        f"{name} {folder} is in use by {who}: it holds the lock {path}. Wait until it ends, or stop it and continue "
        "with --resume (resume=True)"
    )


@contextmanager
def folder_lock(folder: str | os.PathLike, name: str = "output_dir"):
    """Hold the OS lock of ``folder`` for the body, or raise FolderBusy at once when another process holds it."""
    from filelock import FileLock, Timeout

    path = sibling(folder, LOCK)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise _busy(Path(folder), path, name) from None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "w") as f:
            f.write(_holder())
        yield path
    finally:
        lock.release()


def check_not_busy(folder: str | os.PathLike, name: str) -> None:
    """A FolderBusy error when another process is writing ``folder`` (an input about to be read)."""
    from filelock import FileLock, Timeout

    path = sibling(folder, LOCK)
    if not path.exists():
        return
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise _busy(Path(folder), path, name) from None
    lock.release()


def _exchange(a: Path, b: Path) -> None:
    """Swap two folders in one step (Linux renameat2 with RENAME_EXCHANGE); OSError where that is not possible."""
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, "folder exchange needs Linux")
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # a C library older than glibc 2.28
        raise OSError(errno.ENOSYS, "renameat2 is missing from the C library")
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a))


def replace_folder(new: Path, target: Path) -> Path | None:
    """Make the complete folder ``new`` appear at ``target`` so that a kill at any moment leaves ``target`` either
    whole as before or whole as new; returns where the previous ``target`` now is (None: there was none). The caller
    removes it.

    ``new`` is flushed to the disk first. Where ``target`` exists the two are exchanged in one step on Linux. Where the
    filesystem cannot do that, ``target`` is renamed aside to ``.NAME.acip-old`` and ``new`` renamed in: a kill between
    those two renames leaves no ``target`` for an instant, and :func:`recover` finishes the swap on the next call.
    """
    fsync_tree(new)
    if not target.exists():
        os.rename(new, target)
        fsync_path(target.parent)
        return None
    try:
        _exchange(new, target)
        previous = new
    except OSError as error:
        if error.errno not in _NO_EXCHANGE:
            raise
        previous = sibling(target, OLD)
        os.rename(target, previous)
        os.rename(new, target)
    fsync_path(target.parent)
    return previous


def remove_tree(path: Path) -> None:
    """Delete one of acip's own temporary folders (never a user's)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _same_run(a: Path, b: Path) -> bool:
    """Whether two folders hold records of the same run (a finished run's leftover work folder)."""
    for name in KINDS:
        one, two = read_record(a, name), read_record(b, name)
        if one and two and one.get("run_id") and one.get("run_id") == two.get("run_id"):
            return True
    return False


def _leftovers(target: Path) -> bool:
    """Whether killed processes left anything around ``target`` that :func:`recover` would put right."""
    stage, old, new = sibling(target, STAGE), sibling(target, OLD), sibling(target, NEW)
    return (stage.exists() or _file_stage(target).exists() or old.exists()
            or (new.exists() and target.exists() and _same_run(new, target)))  # fmt: skip


def tidy(target: str | os.PathLike, name: str = "output_dir") -> None:
    """Put right what killed processes left around ``target``, under its lock, and say what was done; writes
    nothing (not even the lock file) when nothing was left."""
    target = Path(os.path.abspath(target))
    if not _leftovers(target):
        return
    with folder_lock(target, name):
        for note in recover(target):
            print(f"acip: {note}", file=sys.stderr)


def recover(target: str | os.PathLike) -> list[str]:
    """Put right what killed processes left around ``target`` (call with its lock held); returns what was done."""
    target = Path(os.path.abspath(target))
    stage, old, new = sibling(target, STAGE), sibling(target, OLD), sibling(target, NEW)
    done = []
    if old.exists():
        if not target.exists():  # a swap stopped between its two renames; the stage was complete before it began
            os.rename(stage if stage.exists() else old, target)
            done.append(f"finished an interrupted replacement of {target}")
        if old.exists():
            remove_tree(old)
    if stage.exists():
        remove_tree(stage)
        done.append(f"removed {stage}, left by a killed save (an unfinished new folder, or the replaced old one)")
    if new.exists() and target.exists() and _same_run(new, target):
        remove_tree(new)
        done.append(f"removed {new}, the work folder of a run that had completed")
    if _file_stage(target).exists():
        remove_tree(_file_stage(target))
        done.append(f"removed {_file_stage(target)}, left by a killed write of {target.name}")
    return done



def fresh_stage(target: Path) -> Path:
    """An empty stage folder for the next version of ``target``."""
    stage = sibling(target, STAGE)
    remove_tree(stage)
    stage.mkdir(parents=True)
    return stage


def replaceable(folder: Path, overwrite: bool, name: str) -> None:
    """An error naming ``name`` unless ``folder`` is absent or empty, or ``overwrite`` and acip wrote all of it."""
    if not folder.exists() or not any(folder.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{name} {folder} is not empty; pass overwrite=True (--overwrite) to replace it (only a folder acip "
            "wrote, and only once the new one is complete)"
        )
    foreign = foreign_files(folder)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{name} {folder} holds files acip did not write ({shown}); --overwrite only replaces folders acip "
            "wrote: move those files, or choose another folder"
        )


def _file_stage(target: Path) -> Path:
    """Where the next version of the file ``target`` is written (its suffix kept: some writers insist on it)."""
    return target.parent / f"{sibling(target, STAGE).name}{target.suffix}"


class Replacement:
    """An output being replaced under its lock (see :func:`replacing`): what its check returned, and its stage."""

    def __init__(self, target: Path, checked, file: bool):
        self.target, self.checked, self.file = target, checked, file

    @contextmanager
    def staged(self):
        """A stage beside the output for the body to write the new version into (a fresh empty folder, or for a
        file a path to write); when the body ends it is swapped in and the previous version removed, and when the
        body fails it is removed and the output is as it was."""
        if self.file:
            stage = _file_stage(self.target)
            remove_tree(stage)
        else:
            stage = fresh_stage(self.target)
        try:
            yield stage
            if self.file:  # a file is replaced in one rename: flushed, renamed over the target, the folder flushed
                fsync_path(stage)
                os.replace(stage, self.target)
                fsync_path(self.target.parent)
            else:
                previous = replace_folder(stage, self.target)
                if previous is not None:
                    remove_tree(previous)
        except BaseException:
            remove_tree(stage)
            raise


@contextmanager
def replacing(target: str | os.PathLike, name: str, check, *, file: bool = False, main: bool = True):
    """Write a new version of the output ``target`` (a folder, or with ``file`` one file) by the output-folder
    protocol: refuse at once when another process holds it; put right what killed processes left; ``check()`` (it
    raises an error naming ``name`` when the output may not be written) before anything is written; hold the lock and
    ``check()`` again (another process may have written meanwhile); the body then writes through
    :meth:`Replacement.staged`. Yields the Replacement, whose ``checked`` is what the second ``check()`` returned.

    ``main``: False on the other processes of a multi-process run, which check but leave the folder to the main one.
    """
    target = Path(os.path.abspath(target))
    if main:
        check_not_busy(target, name)  # a run in progress there: say so before anything else
        tidy(target, name)  # what killed processes left (only then is anything written)
    check()  # refuse what can be refused before anything is written, the lock file included
    with folder_lock(target, name) if main else nullcontext():
        yield Replacement(target, check(), file)
