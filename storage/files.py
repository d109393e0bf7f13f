"""Writing files so that nothing already computed is lost, and reading names from files so that data never becomes
a path: atomic writes (temporary file, fsync, rename, retried while Windows holds the target), writability checks
before the work, plain names."""
import contextlib
import io
import os
import re
import tempfile
import time
from pathlib import Path

import torch

from common.errors import CutPasteError

# Seconds waited before each retry of a refused rename over an existing file: on Windows a file another program
# holds open (a spreadsheet showing the CSV, an antivirus scan) cannot be replaced until it lets go.
REPLACE_WAITS_S = (0.05, 0.1, 0.2, 0.4, 0.8)
# Names Windows gives to devices, in any case and with any extension: a file "CON.csv" is the console, not a file.
RESERVED_NAMES = re.compile(r"(CON|PRN|AUX|NUL|CONIN\$|CONOUT\$|(COM|LPT)[0-9\u00b9\u00b2\u00b3])(\..*)?",
                            re.IGNORECASE)
# Characters no Windows file name may hold (':' also makes "C:x" a path relative to drive C's working folder).
NOT_IN_NAMES = '<>:"|?*/\\'


class FileInUse(CutPasteError, PermissionError):
    """A file that could not be replaced because another program holds it: one line for the user (a CutPasteError),
    and still the OSError that callers who keep going after a failed write catch."""


def atomic_write(path: Path, write, mode: str = "wb") -> None:
    """write(file) into a temporary file beside `path`, fsync, rename over `path`: a crash leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    text = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}  # the same bytes on every system
    try:
        with os.fdopen(fd, mode, **text) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; shared folders stay shared
        replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def replace(src, dst: Path) -> None:
    """os.replace(src, dst), retried for about 1.5 s while the system refuses it (Windows, where another program
    holds `dst` open); then FileInUse, naming the file."""
    for wait in (*REPLACE_WAITS_S, None):
        try:
            os.replace(src, dst)
            return
        except PermissionError as err:
            if wait is None:
                raise FileInUse(f"cannot replace {dst}: another program holds it open ({err.strerror or err}); "
                                f"close it there (a spreadsheet, a viewer) and rerun") from None
            time.sleep(wait)


def write_csv(frame, path: Path) -> None:
    """A pandas frame as CSV, atomically, rows ending in '\\n' (pandas ends them in os.linesep, '\\r\\n' on Windows)."""
    atomic_write(path, lambda fh: frame.to_csv(fh, index=False, lineterminator="\n"), "w")


def atomic_save(obj, path: Path) -> None:
    """torch.save into memory, then one plain write: a full disk raises OSError (ENOSPC), which torch.save's own
    writer turns into a RuntimeError that names no cause."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda fh: fh.write(buffer.getbuffer()))


def same_folder(recorded: str, folder) -> bool:
    """Whether the path text `recorded` names `folder`: the same text, or the same folder on disk (spelled in
    another case on a case-insensitive disk, or reached through another drive letter on Windows)."""
    if recorded == str(folder):
        return True
    try:
        return os.path.samefile(recorded, folder)
    except (OSError, ValueError):  # one of them is gone, or not a path here
        return False


def writable_folder(folder: Path, flag: str) -> Path:
    """Create `folder` and prove a file can be written there, before any work whose results would go there."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise CutPasteError(f"{flag} {folder} is not a writable folder ({err.strerror or err}); "
                            f"give one you can write to") from None
    return folder


def writable_file(path: Path, flag: str) -> Path:
    """`path` can be written as a file: not a folder, in a writable folder."""
    path = Path(path)
    if path.is_dir():
        raise CutPasteError(f"{flag} {path} is a folder; give a file name, e.g. {path / 'predictions.csv'}")
    writable_folder(path.parent, flag)
    return path


def is_plain_name(value) -> bool:
    """One file name on every system: no separator, drive (C:x), device name (CON, NUL, COM1), control character,
    and no trailing dot or space, which Windows drops (so "lid." would be "lid")."""
    return (isinstance(value, str) and value not in ("", ".", "..") and not any(c in NOT_IN_NAMES for c in value)
            and all(ord(c) >= 32 for c in value) and value[-1] not in ". " and not RESERVED_NAMES.fullmatch(value))


def plain_name(value, what: str, path: Path) -> str:
    """A name read from a file, checked to be one plain path component: data never becomes a path."""
    if not is_plain_name(value):
        raise CutPasteError(f"{path} holds {what} {value!r}, which is not a plain name; it was not written by "
                            f"this project: remove it from the folder")
    return value
