"""Writing outputs: one guard for every command that writes a file or a folder.

The promises (README, docs/security.md):

* an output is never an input of the same command (model, teacher, recipe, data), through
  links too;
* an output is never anything but a regular file: a device, a pipe, a socket or a folder is
  refused even with ``--force``, and a path whose filesystem cannot hold a file (``/proc``)
  is refused before any work starts;
* an existing file is replaced only with ``--force``, in one rename, so that no reader ever
  sees half a file; temporary files are removed on every exit path that Python sees
  (errors, SIGINT, SIGTERM) and left-overs of killed runs are removed by the next run;
* every output gets the same mode, ``0o666`` less the umask (``mkstemp`` would leave 0600).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from bscompress.core.errors import BadInput

PathLike = str | Path


def output_mode() -> int:
    """The mode of every output file: ``0o666`` less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when ``a`` and ``b`` name the same existing file or folder (links followed)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except (ValueError, OSError):
        return False
    return True


def check_not_input(path: PathLike, inputs: Iterable[PathLike | None], what: str = "output"
                    ) -> None:
    """Refuse ``path`` when it is one of ``inputs`` (or lies inside an input folder).

    ``inputs`` may hold ``None`` and architecture specs (which are not files and are skipped).
    """
    path = Path(path)
    for item in inputs:
        if item is None:
            continue
        item = Path(item)
        if not item.exists():
            continue
        if same_file(path, item) or (path.exists() and path.resolve() == item.resolve()):
            raise BadInput(f"{what} {path} is also an input of this command ({item}): choose "
                           "another output path")
        if item.is_dir() and _inside(path, item):
            raise BadInput(f"{what} {path} lies inside the input folder {item}: choose an "
                           "output path outside it")


def _check_folder(folder: Path, what: str, path: Path) -> None:
    if not folder.exists():
        # a parent that is a regular file shows as "does not exist" for everything below it
        for parent in folder.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise BadInput(f"{what} {path}: {parent} is a file, not a folder")
                break
        raise BadInput(f"{what} {path}: the folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise BadInput(f"{what} {path}: {folder} is a file, not a folder")
    try:  # the filesystem must take a new file (read-only mounts, /proc, permissions)
        fd, probe = tempfile.mkstemp(prefix=".bscompress-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise BadInput(f"{what} {path}: cannot create files in {folder} "
                       f"({err.strerror or err}); choose another folder") from None


#: the extensions of what bscompress writes, by which the commands that read a file choose
#: its format (case-insensitive)
ARCHIVE_SUFFIXES = (".pt", ".pth", ".safetensors")
ONNX_SUFFIXES = (".onnx",)
PNG_SUFFIXES = (".png",)


def check_output_path(path: PathLike, force: bool, inputs: Iterable[PathLike | None] = (),
                      what: str = "output", suffixes: tuple[str, ...] = ()) -> Path:
    """Refuse to write ``path`` where it would break a promise; return it as a ``Path``.

    Raises:
        BadInput: ``path`` is an input, exists without ``force``, is not a regular file
            (even with ``force``), its folder is missing, a file or not writable, or it does
            not end in one of ``suffixes`` (when given).
    """
    path = Path(path)
    check_not_input(path, inputs, what)
    if path.exists() or path.is_symlink():
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = stat.S_IFREG  # a dangling link: the rename replaces the link itself
        if stat.S_ISDIR(mode):
            raise BadInput(f"{what} {path} is a directory: give a file path")
        if not stat.S_ISREG(mode):
            raise BadInput(f"{what} {path} is {_kind(mode)}, not a regular file: bscompress "
                           "never writes over one, even with --force; give a file path")
        if not force:
            raise BadInput(f"{what} {path} already exists: pass --force to overwrite it")
    if suffixes and path.suffix.lower() not in suffixes:
        example = path.with_name((path.stem if path.suffix else path.name) + suffixes[0])
        raise BadInput(f"{what} {path} does not end in {' or '.join(suffixes)}, the extension "
                       f"by which bscompress and other tools tell its format: name it e.g. "
                       f"{example}")
    _check_folder(path.parent, what, path)
    return path


def check_output_dir(path: PathLike, inputs: Iterable[PathLike | None] = (),
                     what: str = "output folder") -> Path:
    """Refuse a run folder that is a file, an input, or that cannot be created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BadInput(f"{what} {path} is a file, not a folder: give a folder path")
    for item in inputs:
        if item is None or not Path(item).exists():
            continue
        if same_file(path, item) or (Path(item).is_dir() and _inside(path, Path(item))):
            raise BadInput(f"{what} {path} is, or lies inside, the input {item}: choose "
                           "another folder")
    parent = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    _check_folder(parent, what, path)
    return path


#: the run folders this process holds the lock of: the file object of each folder's mark
_LOCKED: dict[Path, Any] = {}


def lock_folder(folder: PathLike, mark: str) -> bool:
    """Take the exclusive lock of ``folder``'s ``mark`` file (made if missing) for this
    process, until :func:`unlock_folder` or its exit, and return ``True``; for a folder it
    holds already (a run's own fine-tuning step), ``False``.

    Raises:
        BadInput: another process holds it (a second run writing into the same folder would
            interleave their files: each reported outputs that were the other's).
    """
    key = Path(folder).resolve()
    if key in _LOCKED:
        return False
    handle = open(key / mark, "a")  # noqa: SIM115 - held open as the lock, closed by unlock
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise BadInput(f"another bscompress process is writing into {folder}: wait for it to "
                       "end, or choose another --output-dir") from None
    _LOCKED[key] = handle
    return True


def unlock_folder(folder: PathLike) -> None:
    """Release the lock :func:`lock_folder` took (nothing when this process holds none)."""
    handle = _LOCKED.pop(Path(folder).resolve(), None)
    if handle is not None:
        handle.close()


def remove_stale_temporaries(folder: PathLike, names: Iterable[str] = ()) -> list[Path]:
    """Remove the temporary files that killed writers left in ``folder`` (``.NAME.*.tmp`` for
    each of ``names``, every ``.*.tmp`` when ``names`` is empty); return what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    patterns = [f".{name}.*tmp" for name in names] or [".*.tmp"]
    removed = []
    for pattern in patterns:
        for item in folder.glob(pattern):
            with contextlib.suppress(OSError):
                if item.is_dir():
                    shutil.rmtree(item)
                else:
                    item.unlink()
                removed.append(item)
    return removed


def _publish(tmp: Path, path: Path) -> None:
    os.chmod(tmp, output_mode())
    os.replace(tmp, path)


#: free bytes under which a failed write is put down to a full file system (torch.save
#: then fails with "[enforce fail at inline_container.cc] unexpected pos", not ENOSPC)
_NEARLY_FULL = 64 * 2**20


@contextlib.contextmanager
def _disk_full_named(path: Path) -> Iterator[None]:
    """A write into ``path``'s folder that fails because its file system is full (ENOSPC,
    EDQUOT, or any error with under :data:`_NEARLY_FULL` bytes free there) raises
    ``BadInput`` saying so; other errors pass unchanged."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = None
        full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
        if full or (free is not None and free < _NEARLY_FULL):
            raise BadInput(f"cannot write {path}: its file system is full "
                           f"({(free or 0) / 2**20:.1f} MiB free): free some space, or write "
                           "the output elsewhere") from None
        raise


@contextlib.contextmanager
def atomic_output(path: PathLike, force: bool = False,
                  inputs: Iterable[PathLike | None] = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    inputs = tuple(inputs)
    path = check_output_path(path, force, inputs)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise BadInput(f"output {path}: cannot create a file there ({err.strerror or err})") \
            from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _disk_full_named(path):
            yield tmp
        check_output_path(path, force, inputs)  # nothing appeared there in the meantime
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output_with_companions(path: PathLike, force: bool = False,
                                  inputs: Iterable[PathLike | None] = ()) -> Iterator[Path]:
    """Like :func:`atomic_output` for writers that may add companion files named after the
    output (ONNX external data: ``model.onnx.data``): yield ``path``'s name inside a
    temporary folder beside it, then move the file and its companions into place, only on
    success."""
    inputs = tuple(inputs)
    path = check_output_path(path, force, inputs)
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as err:
        raise BadInput(f"output {path}: cannot create a file there ({err.strerror or err})") \
            from None
    try:
        tmp = folder / path.name
        with _disk_full_named(path):
            yield tmp
        companions = [p for p in folder.iterdir() if p != tmp]
        for item in companions:
            check_output_path(path.parent / item.name, force, inputs)
        check_output_path(path, force, inputs)
        for item in companions:
            _publish(item, path.parent / item.name)
        _publish(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_text_atomic(path: PathLike, text: str, force: bool = True,
                      inputs: Iterable[PathLike | None] = ()) -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_output`."""
    with atomic_output(path, force=force, inputs=inputs) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: PathLike, data: Any) -> None:
    """Replace ``path`` by ``data`` as JSON in one rename (caches: no overwrite check, but
    never over a folder or a device)."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise BadInput(f"{path} is not a regular file: give a file path for the cache")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BadInput(f"cannot create the folder of {path} ({err.strerror or err})") from None
    with atomic_output(path, force=True) as tmp:
        tmp.write_text(dumps(data))


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def dumps(data: Any, **kwargs: Any) -> str:
    """``json.dumps`` that always writes valid JSON: NaN and ±Inf become ``null``."""
    return json.dumps(finite_json(data), allow_nan=False, **kwargs)
