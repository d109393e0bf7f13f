"""Getting MVTec AD: a resumable download with a progress bar, a SHA-256 check and a safe extraction.

    python dataset.py --download Data

A rerun or retry resumes ``<name>.part`` with an HTTP Range request; an archive whose SHA-256 does not match is
moved aside, never extracted. Extraction goes to a staging folder first and refuses links, special files and paths
outside the folder before anything lands in the target folder.
"""
import hashlib
import http.client
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from common.errors import CutPasteError

# The official archive (Bergmann et al., CVPR 2019), as other tools fetch it, and its SHA-256.
MVTEC_URL = ("https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/download/"
             "420938113-1629960298/mvtec_anomaly_detection.tar.xz")
MVTEC_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
MVTEC_ARCHIVE = "mvtec_anomaly_detection.tar.xz"
READ_TIMEOUT_S = 60.0  # a read that stalls this long counts as an interrupted transfer
DOWNLOAD_RETRIES = 3
CHUNK_BYTES = 1 << 20
DONE_MARKER = ".mvtec_download_complete"  # written after a verified, complete extraction
STAGING = ".extracting"


def archive_name(url: str) -> str:
    """The archive's file name from `url`, checked: an http(s) or file address whose path ends in a file name."""
    parts = urllib.parse.urlparse(url)
    if parts.scheme not in ("http", "https", "file") or (parts.scheme != "file" and not parts.netloc):
        raise CutPasteError(f"--url {url!r} is not an http(s) address; give one like https://host/archive.tar.xz")
    name = os.path.basename(parts.path)
    if name in (".", ".."):
        raise CutPasteError(f"--url {url!r} ends in {name!r}, not an archive's file name; give the archive's address")
    return name or MVTEC_ARCHIVE


def _content_range_start(header: str | None) -> tuple[int, int | None]:
    """'bytes START-END/TOTAL' -> (START, TOTAL or None)."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (header or "").strip())
    if not match:
        return -1, None
    return int(match.group(1)), None if match.group(2) == "*" else int(match.group(2))


def _open(url: str, start: int, timeout: float):
    """The HTTP response for `url` from byte `start`; None when the server says nothing is left (416)."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        return urllib.request.build_opener().open(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and start:
            return None
        raise CutPasteError(f"{url} answered HTTP {err.code} ({err.reason}); check the address (--url)") from None


def _transfer(url: str, part: Path, timeout: float) -> None:
    """Append the rest of `url` to `part` (or start it over when the server ignores the Range)."""
    have = part.stat().st_size if part.exists() else 0
    response = _open(url, have, timeout)
    if response is None:
        return
    with response:
        start, total = _content_range_start(response.headers.get("Content-Range"))
        mode = "ab" if have and response.status == 206 and start == have else "wb"
        if mode == "wb":
            if have:
                print(f"the server does not continue at byte {have}; downloading {part.name} from the start")
            have, length = 0, response.headers.get("Content-Length")
            total = int(length) if length else None
        if total is not None and total - have > shutil.disk_usage(part.parent).free:
            raise CutPasteError(f"{part.parent} has {shutil.disk_usage(part.parent).free} bytes free, the download "
                                f"needs {total - have} more; free space or download elsewhere")
        with open(part, mode) as fh, tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                                          desc=part.name, dynamic_ncols=True) as bar:
            while chunk := response.read(CHUNK_BYTES):
                fh.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size != total:
        raise OSError(f"connection closed after {part.stat().st_size} of {total} bytes")


def fetch(url: str, dest: Path, retries: int = DOWNLOAD_RETRIES, timeout: float = READ_TIMEOUT_S) -> Path:
    """Download `url` to `dest` through `dest`.part, resuming it; after `retries` failed resumptions, stop clearly."""
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, timeout)
            part.replace(dest)
            return dest
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            reason = err  # err itself is unbound once the except clause ends
            if attempt < retries:
                print(f"download interrupted ({reason}); resuming, retry {attempt + 1} of {retries}")
    kept = part.stat().st_size if part.exists() else 0
    raise CutPasteError(f"downloading {url} failed ({reason}); {kept} bytes are kept in {part}: rerun the same "
                        f"command to resume")


def verify(path: Path, expected: str) -> None:
    """Raise, with the file moved aside to <name>.sha256-mismatch, unless its SHA-256 is `expected`."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                                      desc=f"sha256 {path.name}", dynamic_ncols=True) as bar:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
            bar.update(len(chunk))
    actual = digest.hexdigest()
    if actual != expected.lower():
        aside = path.with_name(path.name + ".sha256-mismatch")
        path.replace(aside)
        raise CutPasteError(f"{path.name} has SHA-256 {actual}, expected {expected}; it was moved aside to {aside} "
                            f"and not extracted: rerun to download it again, or check --url and --sha256")


def check_member(member: tarfile.TarInfo, root: Path, archive: Path) -> None:
    """Refuse links, device and other special files, and paths that would land outside `root`."""
    if not (member.isfile() or member.isdir()):
        kind = ("symbolic link" if member.issym() else "hard link" if member.islnk() else
                "device file" if member.ischr() or member.isblk() else "special file")
        raise CutPasteError(f"refused {kind} {member.name!r} in {archive}: the archive is not a plain MVTec AD "
                            f"archive; nothing was extracted")
    real_root = os.path.realpath(root)
    target = os.path.realpath(os.path.join(real_root, member.name))
    try:
        inside = os.path.commonpath([real_root, target]) == real_root
    except ValueError:  # Windows: a name with a drive ("D:x") lands on another drive, with no common path
        inside = False
    if os.path.isabs(member.name) or not inside:
        raise CutPasteError(f"refused member {member.name!r} in {archive}: it would be written outside {root}; "
                            f"nothing was extracted")


def safe_extract(archive: Path, dest: Path) -> list[str]:
    """Extract into dest/.extracting, checking each member, then move the top-level entries into `dest`."""
    staging = dest / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tqdm(tar, desc=f"extract {archive.name}", unit=" files", dynamic_ncols=True):
                check_member(member, staging, archive)
                tar.extract(member, staging, filter="data")
        entries = sorted(staging.iterdir())
        clashes = [e.name for e in entries if (dest / e.name).exists()]
        if clashes:
            raise CutPasteError(f"{', '.join(str(dest / c) for c in clashes)} already exist; move them away or "
                                f"extract into an empty folder")
    except (tarfile.TarError, EOFError, OSError, CutPasteError) as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, CutPasteError):
            raise
        if isinstance(err, OSError) and err.errno is not None:  # writing the target failed, not reading the archive
            raise CutPasteError(f"cannot extract {archive} into {dest} ({err}); the archive is kept: free space or "
                                f"fix the folder, then rerun the same command") from None
        raise CutPasteError(f"cannot extract {archive} ({err}); delete it and rerun to download it again") from None
    for entry in entries:
        entry.replace(dest / entry.name)
    staging.rmdir()
    return [e.name for e in entries]


def download_mvtec(dest: Path, url: str = MVTEC_URL, sha256: str = MVTEC_SHA256, retries: int = DOWNLOAD_RETRIES,
                   keep_archive: bool = True, timeout: float = READ_TIMEOUT_S) -> list[str]:
    """Download, verify and extract the archive into `dest`; return the top-level entries extracted (none when a
    verified extraction of this archive is already there)."""
    dest, name = Path(dest), archive_name(url)
    if dest.exists() and not dest.is_dir():
        raise CutPasteError(f"--download {dest} is a file; give a folder to download and extract into")
    dest.mkdir(parents=True, exist_ok=True)
    marker = dest / DONE_MARKER
    if marker.exists() and marker.read_text(encoding="utf-8").strip() == sha256.lower():
        print(f"{dest} already holds the extracted archive ({marker.name}); nothing to do")
        return []
    archive = dest / name
    if not archive.exists():
        fetch(url, archive, retries, timeout)
    verify(archive, sha256)
    entries = safe_extract(archive, dest)
    marker.write_text(sha256.lower() + "\n", encoding="utf-8", newline="\n")
    if not keep_archive:
        archive.unlink()
    return entries
