"""Speed of the exported detector (export.py) on the CPU, float32, against eager PyTorch, on the same images in one
run: images/s at batch 1 (latency) and at --batch (throughput), and dense localization of one image (section 4.2)
at each --strides, where the export runs all of the image's patches in one call of its runtime. Timing does not
depend on the weights, so an untrained ResNet18 and a random Gaussian are used unless --checkpoint is given.

    python tools/bench_export.py --out doc/benchmark_export_cpu.md
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]  # the project's modules live one folder up

import torch  # noqa: E402

import density as density_lib  # noqa: E402
from config.paper import PAPER_BATCH_SIZE, PAPER_PATCH_SIZE, PAPER_SIZE, PATCH_BATCH  # noqa: E402
from benchmark import cpuinfo, publish  # noqa: E402
from support import checkpoints, export, patches  # noqa: E402
from support.detector import dense_forward, image_forward  # noqa: E402
from support.errors import run_main  # noqa: E402

FILES = {"onnx": "model.onnx", "openvino": "model.xml", "torchscript": "model.pt"}
RUNTIMES = {"onnx": "ONNX Runtime", "openvino": "OpenVINO", "torchscript": "TorchScript"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Time exported detectors against eager PyTorch on the CPU.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="an image-level checkpoint to time instead")
    p.add_argument("--size", type=int, default=PAPER_SIZE, help="image side in pixels (paper: 256)")
    p.add_argument("--batch", type=int, default=PAPER_BATCH_SIZE, help="images per call for throughput")
    p.add_argument("--iters", type=int, default=5, help="timed calls per measurement (medians are kept)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    p.add_argument("--patch_size", type=int, default=PAPER_PATCH_SIZE, help="dense localization: patch side")
    p.add_argument("--strides", type=str, default="4,8", help="dense localization: comma-separated strides")
    p.add_argument("--out", type=Path, default=None, help="also write the table as markdown to this file")
    return p


def timed(fns: dict, iters: int, warmup: int) -> dict:
    """Median seconds per call of each fn, called in turn so that a change of machine load hits all alike."""
    times = {name: [] for name in fns}
    for call in range(warmup + iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if call >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def graphs(args):
    """(name, eager forward, scoring graph, metadata) of the image-level model and of a patch model per stride."""
    torch.manual_seed(0)
    if args.checkpoint is not None:
        net, meta = export.scorer_from_checkpoint(checkpoints.read_checkpoint(args.checkpoint), args.checkpoint)
        model, state = net.model, {"mean": net.mean, "precision": net.precision}
    else:
        model = checkpoints.build_model(1, 2).eval()
        state = {"mean": density_lib.normalize(torch.randn(1, model.embed_dim))[0],
                 "precision": torch.eye(model.embed_dim)}
        meta = {"export_format": export.EXPORT_FORMAT, "category": "random", "size": args.size, "patch_size": 0,
                "stride": 0}
    gaussian, cpu = density_lib.GaussianDensityTorch.from_state_dict(state), torch.device("cpu")
    out = [("image", image_forward(model, gaussian, cpu, False, False),
            export.ImageScorer(model, gaussian.mean, gaussian.precision).eval(), meta)]
    runner = patches.Runner(model, cpu, progress=False)
    for stride in [int(s) for s in args.strides.split(",") if s.strip()]:
        out.append((f"dense stride {stride}", dense_forward(runner, gaussian, args.size, args.patch_size, stride),
                    export.PatchScorer(model, gaussian.mean, gaussian.precision, args.size, args.patch_size,
                                       stride).eval(), {**meta, "patch_size": args.patch_size, "stride": stride}))
    return out


def write_all(net, meta: dict, folder: Path) -> dict:
    """The graph in every format (OpenVINO converted from the ONNX file), and each one's runner."""
    files = {fmt: folder / name for fmt, name in FILES.items()}
    export.write_onnx(net, meta, files["onnx"])
    export.onnx_to_openvino(files["onnx"], meta, files["openvino"])
    export.write_torchscript(net, meta, files["torchscript"])
    return {fmt: export.open_export(path)[0] for fmt, path in files.items()}


def measure(name: str, eager, runs: dict, images: torch.Tensor, args) -> list[dict]:
    """One row per runtime: batch-1 latency, and for the image-level graph batch --batch throughput."""
    calls = {"PyTorch (eager)": lambda x: eager(x)[0].numpy(),
             **{RUNTIMES[fmt]: (lambda x, run=run: run(x.numpy())[0]) for fmt, run in runs.items()}}
    one = timed({k: (lambda f=f: f(images[:1])) for k, f in calls.items()}, args.iters, args.warmup)
    many = {} if name != "image" else timed({k: (lambda f=f: f(images)) for k, f in calls.items()}, args.iters,
                                            args.warmup)
    probe = images if name == "image" else images[:1]
    want = torch.from_numpy(calls["PyTorch (eager)"](probe))
    rows = []
    for runtime, fn in calls.items():
        rel = ((torch.from_numpy(fn(probe)) - want).abs() / want.abs()).max().item()
        rows.append({"measurement": name, "runtime": runtime, "batch 1: ms": 1e3 * one[runtime],
                     "batch 1: images/s": 1 / one[runtime],
                     f"batch {args.batch}: images/s": len(images) / many[runtime] if many else float("nan"),
                     "max relative difference to eager": rel})
    return rows


def report(args, rows: list[dict]) -> str:
    import onnxruntime
    import openvino
    info = cpuinfo()
    flags = set(info.get("flags", "").split())
    has = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))
    lines = [f"# Exported detector on the CPU, float32 ({args.size} px)", "",
             f"Machine: {info.get('model name', 'unknown CPU')} ({has}), {torch.get_num_threads()} threads; torch "
             f"{torch.__version__}, onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__}", "",
             f"Medians of {args.iters} calls after {args.warmup} warm-up, the same random uint8 images for every "
             f"runtime, from uint8 images to scores (dense: to the upsampled {args.size} px map of one image, "
             f"{args.patch_size} px patches; eager PyTorch in batches of {PATCH_BATCH} patches, the exports "
             f"all of the image's patches in one call). Written by tools/bench_export.py.", "",
             "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    for row in rows:
        cells = [f"{v:.3g}" if isinstance(v, float) and k.startswith("max") else f"{v:.2f}"
                 if isinstance(v, float) and v == v else "–" if isinstance(v, float) else str(v) for k, v in row.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    images = export.example_batch(args.size, args.batch)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, eager, net, meta) in enumerate(graphs(args)):
            (Path(tmp) / str(i)).mkdir()
            rows += measure(name, eager, write_all(net, meta, Path(tmp) / str(i)), images, args)
    publish(report(args, rows), args.out)
    return rows


if __name__ == "__main__":
    run_main(main)
