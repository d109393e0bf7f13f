"""The downloads against a local HTTP server on 127.0.0.1: MVTec AD (resume, checksum, hostile members) and
torchvision's ImageNet weights into an empty torch cache, as on a fresh machine.

No test here touches the internet: the server is started by the test on the loopback interface,
serves an archive or weights file the test builds, and stops itself (at teardown, or after SERVER_LIFETIME_S).
"""
import errno
import hashlib
import io
import re
import socket
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from torchvision.models import ResNet18_Weights, resnet18

import dataset
import run_training
from common.errors import CutPasteError, run_main
from storage import checkpoints, download
from training import pretrained

SERVER_LIFETIME_S = 60.0
FILES = {
    "toy/train/good/000.png": b"\x89PNG fake image 0" * 50,
    "toy/train/good/001.png": b"\x89PNG fake image 1" * 50,
    "toy/test/good/000.png": b"\x89PNG fake image 2" * 50,
    "license.txt": b"test archive\n",
}


def build_archive(extra=None) -> bytes:
    """A .tar.xz holding FILES, then an optional extra TarInfo (with data for regular files)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in FILES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if extra is not None:
            info, data = extra
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


class ArchiveServer:
    """Serves `payload` at /<name> with Range support; the first `drops` GETs break off after `cut` bytes."""

    def __init__(self, payload: bytes, name: str = "mini.tar.xz", drops: int = 0, cut: int = 0, stall: float = 0.0):
        self.payload, self.name, self.drops, self.cut, self.stall = payload, name, drops, cut, stall
        self.ranges = []  # the Range header of each GET (None when absent)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path != f"/{server.name}":
                    self.send_error(404)
                    return
                header = self.headers.get("Range")
                server.ranges.append(header)
                if server.stall:  # a connection that stalls: by its end the client has given up, nothing is sent
                    time.sleep(server.stall)
                    return
                start = int(header[len("bytes="):].rstrip("-")) if header else 0
                body = server.payload[start:]
                self.send_response(206 if header else 200)
                if header:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.drops > 0:
                    server.drops -= 1
                    self.wfile.write(body[:server.cut - start])
                    self.wfile.flush()
                    return  # HTTP/1.0: the connection closes, short of Content-Length
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.timer = threading.Timer(SERVER_LIFETIME_S, self.httpd.shutdown)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{self.name}"

    def __enter__(self):
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_interrupted_download_resumes_verifies_and_extracts(tmp_path):
    payload = build_archive()
    cut = len(payload) // 2
    with ArchiveServer(payload, drops=1, cut=cut) as server:
        with pytest.raises(CutPasteError, match=r"rerun the same command to resume") as err:
            download.download_mvtec(tmp_path, server.url, sha(payload), retries=0, timeout=5)
        part = tmp_path / "mini.tar.xz.part"
        assert part.stat().st_size == cut and str(part) in str(err.value)
        assert not (tmp_path / "toy").exists()
        found = dataset.main(["--download", str(tmp_path), "--url", server.url, "--sha256", sha(payload),
                              "--retries", "0"])
        assert server.ranges == [None, f"bytes={cut}-"], "the second request continues where the first stopped"
        assert found == ["toy"]
        for name, data in FILES.items():
            assert (tmp_path / name).read_bytes() == data
        assert (tmp_path / "mini.tar.xz").read_bytes() == payload and not part.exists()
        assert not (tmp_path / download.STAGING).exists()
        assert download.download_mvtec(tmp_path, server.url, sha(payload)) == [], "a rerun has nothing to do"
        assert len(server.ranges) == 2


def test_automatic_retries_resume_within_one_call(tmp_path):
    payload = build_archive()
    with ArchiveServer(payload, drops=2, cut=len(payload) // 3) as server:
        entries = download.download_mvtec(tmp_path, server.url, sha(payload), retries=2, keep_archive=False,
                                          timeout=5)
    assert entries == ["license.txt", "toy"]
    assert server.ranges[0] is None and server.ranges[1:] == [f"bytes={len(payload) // 3}-"] * 2
    assert not (tmp_path / "mini.tar.xz").exists(), "--no-keep_archive removes it after extraction"


def test_checksum_mismatch_is_kept_aside_and_not_extracted(tmp_path):
    payload = build_archive()
    with ArchiveServer(payload) as server:
        with pytest.raises(CutPasteError, match=f"SHA-256 {sha(payload)}, expected {'0' * 64}"):
            download.download_mvtec(tmp_path, server.url, "0" * 64, timeout=5)
        with pytest.raises(CutPasteError, match="HTTP 404"):
            download.download_mvtec(tmp_path / "b", server.url + "-missing", sha(payload), timeout=5)
    aside = tmp_path / "mini.tar.xz.sha256-mismatch"
    assert aside.read_bytes() == payload
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", aside.name], "nothing extracted"


def _member(name, kind):
    info = tarfile.TarInfo(name)
    if kind == "file":
        data = b"pwned"
        info.size = len(data)
        return info, data
    info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "device": tarfile.CHRTYPE,
                 "fifo": tarfile.FIFOTYPE}[kind]
    info.linkname = "../../outside" if kind in ("symlink", "hardlink") else ""
    return info, None


def test_hostile_member_from_the_server_is_refused(tmp_path):
    payload = build_archive(_member("toy/../../escaped.txt", "file"))
    dest = tmp_path / "data"
    with ArchiveServer(payload) as server:
        with pytest.raises(CutPasteError, match=r"refused member 'toy/\.\./\.\./escaped\.txt'.*outside"):
            download.download_mvtec(dest, server.url, sha(payload), timeout=5)
    assert not (tmp_path / "escaped.txt").exists()
    assert sorted(p.name for p in dest.iterdir()) == ["mini.tar.xz"], "nothing of the archive landed"


@pytest.mark.parametrize("name,kind,message", [
    ("/tmp/absolute.txt", "file", "outside"),
    ("toy/link", "symlink", "symbolic link"),
    ("toy/hard", "hardlink", "hard link"),
    ("toy/dev", "device", "device file"),
    ("toy/pipe", "fifo", "special file"),
])
def test_links_devices_and_escapes_are_refused(tmp_path, name, kind, message):
    archive = tmp_path / "a.tar.xz"
    archive.write_bytes(build_archive(_member(name, kind)))
    dest = tmp_path / "data"
    dest.mkdir()
    with pytest.raises(CutPasteError, match=message):
        download.safe_extract(archive, dest)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize("url,message", [
    ("example.com/mvtec.tar.xz", "is not an http(s) address"),
    ("ftp://example.com/mvtec.tar.xz", "is not an http(s) address"),
    ("https://example.com/data/..", "ends in '..', not an archive's file name"),
])
def test_addresses_that_name_no_archive_are_refused_before_anything_is_written(tmp_path, url, message):
    with pytest.raises(CutPasteError, match=re.escape(message)):
        download.download_mvtec(tmp_path / "data", url, "0" * 64)
    assert not (tmp_path / "data").exists()


def test_a_file_as_the_target_folder_is_refused(tmp_path):
    target = tmp_path / "Data"
    target.write_text("a file")
    with pytest.raises(CutPasteError, match=r"--download .*Data is a file; give a folder"):
        dataset.main(["--download", str(target), "--url", "http://127.0.0.1:9/mini.tar.xz"])
    assert target.read_text() == "a file"


def test_a_full_disk_while_extracting_keeps_the_archive_and_says_so(tmp_path, monkeypatch):
    archive = tmp_path / "a.tar.xz"
    archive.write_bytes(build_archive())
    dest = tmp_path / "data"
    dest.mkdir()

    def no_space(self, member, path="", **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(tarfile.TarFile, "extract", no_space)
    with pytest.raises(CutPasteError, match=r"No space left on device\); the archive is kept: free space") as err:
        download.safe_extract(archive, dest)
    assert "download it again" not in str(err.value)
    assert archive.is_file() and list(dest.iterdir()) == []


def test_every_error_is_printed_on_one_line(capsys):
    def main():
        raise CutPasteError("first line\n  second line")
    with pytest.raises(SystemExit) as stopped:
        run_main(main)
    assert stopped.value.code == 2 and capsys.readouterr().err == "error: first line second line\n"


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """A TORCH_HOME that does not exist yet, as on a fresh install: no hub folder, no checkpoints folder."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # as no torch.hub.set_dir call made it
    assert not home.exists() and torch.hub.get_dir() == str(home / "hub")
    return home


def weights_file(state: dict) -> tuple[bytes, str]:
    """`state` serialised, and a file name as torchvision's: <arch>-<the first 10 hex digits of its SHA-256>.pth,
    the prefix torch.hub's check_hash compares (HASH_REGEX, '-([a-f0-9]*)\\.')."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    return payload, f"resnet18-{sha(payload)[:10]}.pth"


def serve_as_imagenet_weights(monkeypatch, server: ArchiveServer) -> None:
    monkeypatch.setattr(ResNet18_Weights.IMAGENET1K_V1.value, "url", server.url)


def test_a_fresh_machine_downloads_the_imagenet_weights_and_trains(tmp_path, monkeypatch, mvtec_root,
                                                                  empty_torch_home):
    reference = resnet18(weights=None).state_dict()
    payload, name = weights_file(reference)
    with ArchiveServer(payload, name=name) as server:
        serve_as_imagenet_weights(monkeypatch, server)
        # The README's first training, shortened: ImageNet weights by default, the backbone frozen for
        # --freeze_resnet (20) steps, so after 2 steps it still holds the served weights.
        (path,) = run_training.main(["--data_dir", str(mvtec_root), "--type", "lid", "--model_dir",
                                     str(tmp_path / "models"), "--log_dir", str(tmp_path / "logs"), "--size", "32",
                                     "--epochs", "2", "--batch_size", "4", "--workers", "0", "--variant", "normal"])
    cached = empty_torch_home / "hub" / "checkpoints" / name
    assert cached.read_bytes() == payload and server.ranges == [None], "downloaded once, into the new cache"
    trained = checkpoints.read_checkpoint(path)
    assert trained["config"]["pretrained"] is True
    assert torch.equal(trained["state_dict"]["resnet18.conv1.weight"], reference["conv1.weight"])
    again = pretrained.load_pretrained_state(ResNet18_Weights.IMAGENET1K_V1)  # the server is gone: the cache
    assert torch.equal(again["layer4.1.conv2.weight"], reference["layer4.1.conv2.weight"])


def test_a_download_without_the_hash_its_name_promises_is_refused(monkeypatch, empty_torch_home):
    payload, _ = weights_file({"conv1.weight": torch.zeros(1)})
    with ArchiveServer(payload, name="resnet18-0123abcdef.pth") as server:
        serve_as_imagenet_weights(monkeypatch, server)
        with pytest.raises(CutPasteError, match=r"does not have the SHA-256 its name promises.*--no-pretrained"):
            pretrained.load_pretrained_state(ResNet18_Weights.IMAGENET1K_V1)
    assert list((empty_torch_home / "hub" / "checkpoints").iterdir()) == [], "nothing kept, no partial file"


def test_no_network_or_a_stalled_one_ends_in_the_offline_message(monkeypatch, empty_torch_home):
    with socket.socket() as probe:  # a port nothing listens on: connections are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(ResNet18_Weights.IMAGENET1K_V1.value, "url", f"http://127.0.0.1:{port}/resnet18-f37072fd.pth")
    offline = r"not cached at .*resnet18-f37072fd.pth and could not be downloaded.*or train with --no-pretrained"
    with pytest.raises(CutPasteError, match=offline):
        pretrained.load_pretrained_state(ResNet18_Weights.IMAGENET1K_V1)
    monkeypatch.setattr(pretrained, "DOWNLOAD_TIMEOUT_S", 0.3)
    payload, name = weights_file({"conv1.weight": torch.zeros(1)})
    with ArchiveServer(payload, name=name, stall=3.0) as server:
        serve_as_imagenet_weights(monkeypatch, server)
        started = time.perf_counter()
        with pytest.raises(CutPasteError, match=r"could not be downloaded .*timed out"):
            pretrained.load_pretrained_state(ResNet18_Weights.IMAGENET1K_V1)
        assert time.perf_counter() - started < 2.5, "the timeout ends the wait, not the server"
    assert socket.getdefaulttimeout() is None, "the process's default timeout is restored"
