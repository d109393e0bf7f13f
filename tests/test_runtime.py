"""The automatic runtime settings: bf16 where native, channels-last where it is faster, flags win; malloc."""
import argparse
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training import devices


def settings(amp=None, channels_last=None):
    return argparse.Namespace(amp=amp, channels_last=channels_last)


def test_auto_follows_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(devices, "bf16_supported", lambda device, native=native: native)
        args = settings()
        devices.choose(args, cpu)
        assert (args.amp, args.channels_last) == (native, native), "float32 on a CPU runs in plain NCHW"


def test_explicit_flags_win(monkeypatch):
    monkeypatch.setattr(devices, "bf16_supported", lambda device: True)
    args = settings(amp=False, channels_last=True)
    devices.choose(args, torch.device("cpu"))
    assert (args.amp, args.channels_last) == (False, True)


def test_bf16_can_be_forced_off(monkeypatch):
    monkeypatch.setenv(devices.NO_BF16_ENV, "1")
    assert devices.bf16_supported(torch.device("cpu")) is False
    args = settings()
    devices.choose(args, torch.device("cpu"))
    assert (args.amp, args.channels_last) == (False, False)


def test_start_up_line_names_the_settings():
    line = devices.describe(torch.device("cpu"), False, False)
    assert line.startswith("cpu (") and "threads" in line and line.endswith("float32, NCHW")
    assert devices.describe(torch.device("cpu"), True, True).endswith("bf16 autocast, channels-last")


_RSS_KEPT_SCRIPT = """
import os, torch
from training import devices
def kept_after_free():
    page = os.sysconf("SC_PAGE_SIZE")
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
    before = rss()
    x = torch.ones(64 << 20, dtype=torch.uint8)
    del x
    return rss() - before
print(kept_after_free() < 16 << 20, devices.keep_freed_memory(), kept_after_free() > 48 << 20)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not Path("/proc/self/statm").exists(),
                    reason="mallopt and /proc are glibc's and Linux's")
def test_keep_freed_memory_keeps_the_pages_of_a_freed_tensor():
    """By default a freed 64 MB tensor goes back to the OS; after keep_freed_memory its pages stay for reuse."""
    out = subprocess.run([sys.executable, "-c", _RSS_KEPT_SCRIPT], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "True"]
