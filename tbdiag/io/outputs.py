"""Output files: checked before any work (never an input, never inside an input folder, no folder, no two
options on one file, never over an existing checkpoint unless asked) and written atomically — one file (`atomic_write`, `atomic_save`) or several, all or
none (`write_outputs`; `temporary_beside`, `fill` and `replace_all` for writers of other kinds of files)."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

from tbdiag.errors import TbdiagError

# Model weights in any format (compared in lower case): never replaced unasked, and a text output (JSON, CSV,
# HTML) is never named like one.
CHECKPOINT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".th", ".pkl", ".tar", ".h5",
                                 ".msgpack", ".onnx", ".ot", ".gguf", ".tflite", ".pb", ".npz"})
# Files a reader of an input folder opens or may open: checkpoints tbdiag reads, shard indexes, configs, run state.
READ_SUFFIXES = frozenset({".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".th", ".pkl", ".tar", ".json", ".jsonl"})
FOLDER_DEPTH = 3  # input folders are searched this deep for files an output must not replace


def jsonable(obj: Any) -> Any:
    """Replace non-finite floats with ``None`` (JSON ``null``), recursively; tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def check_outputs(targets: Sequence[str | Path], inputs: Sequence[str | Path] = (), *, overwrite: bool = False,
                  weights: Collection[str | Path] = ()) -> list[Path]:
    """Check output files before any work starts; return the paths they will be written to.

    Every target is a text file (JSON, CSV, HTML) except those also listed in ``weights`` (checkpoints). A
    text target named like a checkpoint (``CHECKPOINT_SUFFIXES``) is refused; an existing file that is a
    checkpoint, by its name or by its content, is replaced only when ``overwrite`` (see `refuse_checkpoint`).

    Refused, with a one-line `TbdiagError`: a target that is a folder or not a regular file, whose folder
    does not exist or cannot be written, that two targets name (through any spelling), that is an input or
    the same file as one (symlinks, hard links, relative paths), that is the same file as any file an input
    folder holds (a shard, an index, a run's metrics, a tokenizer or model card: every file of a model
    folder is part of it), or that is a new file inside an input folder with a name that folder's reader
    would pick up (``READ_SUFFIXES``). A symlink target is written through: the file it points to is
    replaced, the link stays.
    """
    resolved: list[Path] = []
    seen: dict[Path, str] = {}
    for target in targets:
        if not str(target).strip():  # Path("") would be the working folder
            raise TbdiagError("an output path is empty; name a file")
        path = Path(target).resolve()
        if path.is_dir():
            raise TbdiagError(f"{target}: is a folder; name a file (e.g. {Path(target) / 'out'})")
        if path.exists() and not path.is_file():
            raise TbdiagError(f"{target}: is not a regular file; name a regular file")
        if not path.parent.is_dir():
            raise TbdiagError(f"{target}: folder {Path(target).parent} does not exist; create it or choose another path")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise TbdiagError(f"{target}: folder {Path(target).parent} is not writable; choose another path")
        if path in seen:
            raise TbdiagError(f"{target}: names the same file as {seen[path]}; give each output its own file")
        seen[path] = str(target)
        _refuse_inputs(str(target), path, inputs)
        if target not in weights and path.suffix.lower() in CHECKPOINT_SUFFIXES:
            raise TbdiagError(f"{target}: is named like a checkpoint ({path.suffix}) but would hold text; "
                              "give it a .json, .csv or .html name")
        if not overwrite:
            refuse_checkpoint(str(target), path)
        resolved.append(path)
    return resolved


def refuse_checkpoint(target: str, path: Path) -> None:
    """Raise when ``path`` is an existing checkpoint (by its name or its content): never replaced unasked."""
    from tbdiag.io.checkpoint import sniff  # reading stage; imported here so that writing does not pull it in

    if not path.is_file():
        return
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        try:
            sniff(path)
        except TbdiagError:
            return  # not a checkpoint by its name nor by its content
    raise TbdiagError(f"{target}: is an existing checkpoint; write to another file, or allow overwrite=True "
                      "to replace it", cli={"allow overwrite=True": "pass --overwrite"})


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _refuse_inputs(target: str, path: Path, inputs: Sequence[str | Path]) -> None:
    """Raise when the output ``path`` (resolved) is, or lies among the read files of, one of ``inputs``."""
    ident = _identity(path)
    for source in inputs:
        source_path = Path(source)
        if not source_path.exists():
            continue  # reported by whoever reads it
        if ident is not None and _identity(source_path) == ident:
            raise TbdiagError(f"{target}: is the input {source}; write the output to another file")
        if not source_path.is_dir():
            continue
        folder = source_path.resolve()
        if path.is_relative_to(folder) and path.exists():
            raise TbdiagError(f"{target}: is a file of the input folder {source}, part of the input; write the "
                              "output outside that folder")
        if ident is not None:
            for held in _held_files(folder):
                if _identity(held) == ident:
                    raise TbdiagError(f"{target}: is the same file as {held}, part of the input {source}; "
                                      "write the output to another file")
        if path.is_relative_to(folder) and path.suffix.lower() in READ_SUFFIXES:
            raise TbdiagError(f"{target}: is inside the input folder {source}, which reads files like it; "
                              "write the output outside that folder")


def _held_files(folder: Path) -> Iterator[Path]:
    """Every file in ``folder``, ``FOLDER_DEPTH`` levels deep (links to folders are not followed)."""
    level = [folder]
    for _ in range(FOLDER_DEPTH):
        below = []
        for d in level:
            try:
                entries = list(d.iterdir())
            except OSError:
                continue
            for entry in entries:
                if entry.is_dir() and not entry.is_symlink():
                    below.append(entry)
                elif entry.is_file():
                    yield entry
        level = below


def usual_mode(mode: int) -> int:
    """``mode`` less the process umask: what a plain ``open``/``mkdir`` would give (mkstemp/mkdtemp give 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def temporary_beside(path: Path) -> Path:
    """An empty temporary file beside ``path`` with the usual permissions (mkstemp makes 0600)."""
    folder = path.parent  # "." for a bare name
    if not folder.is_dir():
        raise TbdiagError(f"{path}: folder {folder} does not exist; create it or choose another path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise TbdiagError(f"{path}: cannot write in {folder} ({exc.strerror}); choose another path") from exc
    os.close(fd)
    try:
        os.chmod(tmp, usual_mode(0o666))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def fill(tmp: Path, write: Callable[[Path], None]) -> None:
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())


def atomic_save(path: str | Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    A crash at any moment leaves either the old file or the new one, never a half-written file.

    Raises:
        TbdiagError: the folder does not exist or is not writable.
    """
    path = Path(path)
    tmp = temporary_beside(path)
    try:
        fill(tmp, write)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see `atomic_save`)."""
    atomic_save(path, lambda tmp: _write_text(tmp, text))


def _write_text(tmp: Path, text: str) -> None:
    tmp.write_text(text, encoding="utf-8", newline="")


def write_outputs(files: Sequence[tuple[str | Path, str]]) -> None:
    """Write every ``(path, text)`` or none of them.

    Each text goes to a temporary file beside its path first; only when all are written and synced are
    they renamed over their paths. Should a rename fail, the files already replaced get their previous
    content back (kept meanwhile as a hard link) and files that did not exist are removed. Paths should
    have passed `check_outputs`.

    Raises:
        TbdiagError: a folder is missing or not writable, or a write or rename failed; nothing was written.
    """
    temps: list[tuple[Path, Path]] = []
    try:
        for path, text in files:
            path = Path(path)
            temps.append((path, temporary_beside(path)))
            fill(temps[-1][1], lambda tmp, text=text: _write_text(tmp, text))
        replace_all(temps)
    except OSError as exc:
        where = next((str(p) for p, t in temps if str(t) == exc.filename), exc.filename or "output")
        raise TbdiagError(f"{where}: cannot write ({exc.strerror}); nothing was written; "
                          "check the disk and the folder's permissions") from None
    finally:
        for _, tmp in temps:
            tmp.unlink(missing_ok=True)


def replace_all(temps: Sequence[tuple[Path, Path]]) -> None:
    """Rename each temporary over its path; on a failure, put back what the earlier renames replaced."""
    done: list[tuple[Path, Path | None]] = []  # (path, hard link to its previous content, or None: was new)
    try:
        for path, tmp in temps:
            previous = _keep(path)
            try:
                os.replace(tmp, path)
            except BaseException:
                if previous is not None:
                    previous.unlink(missing_ok=True)
                raise
            done.append((path, previous))
    except BaseException:
        for path, previous in reversed(done):
            if previous is not None:
                os.replace(previous, path)
            else:
                path.unlink(missing_ok=True)
        raise
    finally:
        for _, previous in done:
            if previous is not None:
                previous.unlink(missing_ok=True)


def _keep(path: Path) -> Path | None:
    """A hard link to (or, where links are not possible, a copy of) ``path`` beside it; None: no such file."""
    if not path.exists():
        return None
    keep = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.keep")
    try:
        os.link(path, keep)
    except OSError:
        shutil.copy2(path, keep)
    return keep
