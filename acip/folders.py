"""The folders acip writes: checked before anything is written, locked while a process writes them, and replaced
only by a complete new folder, swapped in at once.

For an output folder ``runs/demo`` acip uses these siblings (hidden names next to it, never inside it):

* ``runs/.demo.acip-lock``: the lock file. One process at a time holds it (an OS file lock, :func:`folder_lock`);
  it records the holder's pid, command and start time for the message another process gets.
* ``runs/.demo.acip-new``: a run started with ``--overwrite`` while ``runs/demo`` holds a previous result lives here
  (record, log, checkpoints) until it is complete; ``--resume`` finds it here.
* ``runs/.demo.acip-save``: the stage of a final save or an export: written completely, flushed, then swapped with
  ``runs/demo`` (:func:`replace_folder`); afterwards it holds the previous contents, which are removed.
* ``runs/.demo.acip-old``: only where the filesystem cannot swap two folders at once (see :func:`replace_folder`).

Whatever a killed process leaves of these is put right by the next acip command on the same folder
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
from contextlib import contextmanager
from pathlib import Path

from .checkpoints import latest_checkpoint
from .files import fsync_path, fsync_tree
from .records import COMMANDS, KINDS, config_from_record, folder_record, foreign_files, read_record

LOCK, NEW, STAGE, OLD = "acip-lock", "acip-new", "acip-save", "acip-old"
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100  # linux/fs.h, fcntl.h
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock; the message names it (pid, command, start time)."""


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
    return (stage.exists() or old.exists() or any(target.parent.glob(f".{target.name}.export-*"))
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
    for legacy in target.parent.glob(f".{target.name}.export-*"):  # written by acip before these names existed
        if legacy.is_dir() and not _alive(legacy.name.rsplit("-", 1)[-1]):
            remove_tree(legacy)
            done.append(f"removed {legacy}, left by a killed export")
    return done


def _alive(pid: str) -> bool:
    """Whether the process ``pid`` (a string from a folder name) still runs."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


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


class RunFolder:
    """The folders of one training run: ``result`` (what the user named), where the run lives until it is complete
    (``result`` itself, or ``.NAME.acip-new`` while ``result`` holds a previous result), and the stage of its save."""

    def __init__(self, result: str | os.PathLike, record_file: str):
        self.result = Path(os.path.abspath(result))
        if self.result.is_symlink():  # swap at the real place; the link keeps pointing there
            self.result = Path(os.path.realpath(self.result))
        self.record_file = record_file
        self.new = sibling(self.result, NEW)

    @property
    def work(self) -> Path:
        """Where the run in progress lives (once :meth:`prepare` ran)."""
        return self.new if self.new.exists() else self.result

    def check(self, resume: bool, overwrite: bool, name: str = "output_dir") -> Path:
        """Where the run will live, or an error naming ``name`` when the folders do not allow this run."""
        if resume:
            return self._resumable(name)
        if not self.new.exists():
            replaceable(self.result, overwrite, name)
            return self.new if self.result.exists() and any(self.result.iterdir()) else self.result
        if not overwrite:
            raise FileExistsError(
                f"{name} {self.result} has an unfinished run in {self.new}; pass resume=True (--resume) to continue "
                "it, or overwrite=True (--overwrite) to start anew"
            )
        replaceable(self.result, overwrite, name)
        return self.new

    def _resumable(self, name: str) -> Path:
        """The folder of the run to resume, or an error saying why there is none."""
        work = self.work
        kind = folder_record(work) if work.is_dir() else None
        if kind is not None and kind != self.record_file:
            raise ValueError(
                f"cannot resume {name} {self.result}: it holds {KINDS[kind]}, not {KINDS[self.record_file]}; "
                f"resume it with {COMMANDS[kind]} --resume"
            )
        if kind is None:
            raise FileNotFoundError(f"nothing to resume in {name} {self.result}: no acip run was started there")
        if latest_checkpoint(work) is None:
            finished = (read_record(work, kind) or {}).get("finished")
            why = "holds a finished run" if finished else "has no checkpoint yet (start it again with --overwrite)"
            raise FileNotFoundError(f"nothing to resume in {name} {self.result}: it {why}")
        return work

    def recorded_config(self, config_class):
        """The settings of the run to resume here, as ``config_class``, or None when there is no such run."""
        work = self.work
        if not work.is_dir() or folder_record(work) != self.record_file:
            return None
        return config_from_record(config_class, read_record(work, self.record_file))

    def prepare(self, work: Path, resume: bool) -> Path:
        """Make ``work`` ready for the run (main process, once the inputs are loaded): a new run in
        ``.NAME.acip-new`` replaces an unfinished one there."""
        if work == self.new and not resume:
            remove_tree(self.new)
            print(f"{self.result} keeps its previous contents until this run is complete; the run's record, log and "
                  f"checkpoints are in {self.new} meanwhile (--resume finds them there)", file=sys.stderr)  # fmt: skip
        work.mkdir(parents=True, exist_ok=True)
        fsync_path(work.parent)
        return work

    def publish(self, stage: Path) -> None:
        """Swap the complete ``stage`` in as the result and remove the previous result and the work folder."""
        previous = replace_folder(stage, self.result)
        if previous is not None:
            remove_tree(previous)
        remove_tree(self.new)
