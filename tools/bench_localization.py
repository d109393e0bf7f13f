"""Time dense scoring (Li et al., CVPR 2021, section 4.2): seconds per test image, from uint8 image to
upsampled anomaly map, excluding the one-off fit of the Gaussian on the training patches.

    python bench_localization.py                      # 256 px, 64 px patches, stride 4, on the default device
    python bench_localization.py --device cuda --images 64

Timing does not depend on the weights, so an untrained ResNet18 is used unless --checkpoint is given.
"""
import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

import engine
import localization
from common import bf16_supported, resolve_device, run_main


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Time dense anomaly-map scoring per image.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="image side in pixels (paper: 256)")
    p.add_argument("--patch_size", type=int, default=localization.PAPER_PATCH_SIZE, help="patch side (paper: 64)")
    p.add_argument("--stride", type=int, default=localization.PAPER_STRIDE, help="patch stride (paper: 4)")
    p.add_argument("--images", type=int, default=3, help="timed images (after one warm-up image)")
    p.add_argument("--patch_batch", type=int, default=localization.PATCH_BATCH, help="patches per forward pass")
    p.add_argument("--patch_density", type=str, choices=("shared", "local"), default="local",
                   help="one Gaussian for all positions, or one per location cell (eval's choice for bottle)")
    p.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint to time instead of an untrained model")
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when available)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast; default: on where the device runs bf16 natively")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels-last memory format")
    return p


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = resolve_device(args.device)
    amp = bf16_supported(device) if args.amp is None else args.amp
    if args.checkpoint is not None:
        model = engine.model_from_checkpoint(engine.read_checkpoint(args.checkpoint), args.checkpoint)
    else:
        torch.manual_seed(0)
        model = engine.build_model(1, 3)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt).eval()
    images = (torch.rand(args.images + 1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
              * 255).to(torch.uint8)
    runner = localization.Runner(model, device, amp, args.channels_last, args.patch_batch, progress=False)
    density, _ = localization.fit_patch_density(runner, images[:2], args.patch_size,
                                                local=args.patch_density == "local")
    per_image = []
    # One bar for the run, not one per image: gpu_checks.sh keeps the output in a file. The first image warms the
    # kernels up and is not counted.
    for i in tqdm(range(args.images + 1), desc="dense maps", dynamic_ncols=True):
        _sync(device)
        start = time.perf_counter()
        grid = localization.score_grids(runner, density, images[i:i + 1], args.patch_size, args.stride)
        localization.upsample_scores(grid, args.size, args.size, args.patch_size, args.stride)
        _sync(device)
        per_image.append(time.perf_counter() - start)
    times = torch.tensor(per_image[1:])
    patches = grid.numel()
    print(f"dense scoring on {device} (bf16 autocast {'on' if amp else 'off'}, {torch.get_num_threads()} threads, "
          f"{args.patch_density} Gaussian): "
          f"{args.size} px image, {args.patch_size} px patches, stride {args.stride} = {patches} patches; "
          f"{times.mean():.2f} s per image (min {times.min():.2f}, max {times.max():.2f}, {len(times)} images), "
          f"{1 / times.mean():.2f} images/s")
    return times


if __name__ == "__main__":
    run_main(main)
