"""The automatic runtime settings: bf16 where native, channels-last where it is faster, flags win."""
import argparse

import torch

from support import runtime


def settings(amp=None, channels_last=None):
    return argparse.Namespace(amp=amp, channels_last=channels_last)


def test_auto_follows_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(runtime, "bf16_supported", lambda device, native=native: native)
        args = settings()
        runtime.choose(args, cpu)
        assert (args.amp, args.channels_last) == (native, native), "float32 on a CPU runs in plain NCHW"


def test_explicit_flags_win(monkeypatch):
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: True)
    args = settings(amp=False, channels_last=True)
    runtime.choose(args, torch.device("cpu"))
    assert (args.amp, args.channels_last) == (False, True)


def test_bf16_can_be_forced_off(monkeypatch):
    monkeypatch.setenv(runtime.NO_BF16_ENV, "1")
    assert runtime.bf16_supported(torch.device("cpu")) is False
    args = settings()
    runtime.choose(args, torch.device("cpu"))
    assert (args.amp, args.channels_last) == (False, False)


def test_start_up_line_names_the_settings():
    line = runtime.describe(torch.device("cpu"), False, False)
    assert line.startswith("cpu (") and "threads" in line and line.endswith("float32, NCHW")
    assert runtime.describe(torch.device("cpu"), True, True).endswith("bf16 autocast, channels-last")
