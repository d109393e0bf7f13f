"""Time dense scoring (Li et al., CVPR 2021, section 4.2): seconds per test image, from uint8 image to upsampled
anomaly map, without the one-off fit of the Gaussians. Timing does not depend on the weights, so an untrained
ResNet18 is used unless --checkpoint is given.

    python tools/bench_localization.py --device cuda --images 64
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules live one folder up

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from support import checkpoints, options, patches, runtime  # noqa: E402
from support.errors import run_main  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Time dense anomaly-map scoring per image.",
                                parents=[options.runtime_flags()],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", type=int, default=options.PAPER_SIZE, help="image side in pixels (paper: 256)")
    p.add_argument("--patch_size", type=int, default=options.PAPER_PATCH_SIZE, help="patch side (paper: 64)")
    p.add_argument("--stride", type=int, default=options.PAPER_STRIDE, help="patch stride (paper: 4)")
    p.add_argument("--images", type=int, default=3, help="timed images (after one warm-up image)")
    p.add_argument("--patch_batch", type=int, default=options.PATCH_BATCH, help="patches per forward pass")
    p.add_argument("--patch_density", type=str, choices=("shared", "local"), default="local",
                   help="one Gaussian for all positions, or one per location cell (eval's choice for bottle)")
    p.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint to time instead of an untrained model")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = runtime.resolve_device(args.device, args.cuda)
    runtime.choose(args, device)
    if args.checkpoint is not None:
        model = checkpoints.model_from_checkpoint(checkpoints.read_checkpoint(args.checkpoint), args.checkpoint)
    else:
        torch.manual_seed(0)
        model = checkpoints.build_model(1, 3)
    model = model.to(device, memory_format=runtime.memory_format(args.channels_last)).eval()
    images = (torch.rand(args.images + 1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
              * 255).to(torch.uint8)
    runner = patches.Runner(model, device, args.amp, args.channels_last, args.patch_batch, progress=False)
    density, _ = patches.fit_patch_density(runner, images[:2], args.patch_size, local=args.patch_density == "local")
    sync = runtime.synchronizer(device)
    per_image = []
    # One bar for the run, as gpu_checks.sh keeps the output in a file; the first image is a warm-up, not counted.
    for i in tqdm(range(args.images + 1), desc="dense maps", dynamic_ncols=True):
        sync()
        start = time.perf_counter()
        grid = patches.score_grids(runner, density, images[i:i + 1], args.patch_size, args.stride)
        patches.upsample_scores(grid, args.size, args.size, args.patch_size, args.stride)
        sync()
        per_image.append(time.perf_counter() - start)
    times = torch.tensor(per_image[1:])
    print(f"dense scoring on {runtime.describe(device, args.amp, args.channels_last)} ({args.patch_density} "
          f"Gaussian): {args.size} px image, {args.patch_size} px patches, stride {args.stride} = {grid.numel()} "
          f"patches; {times.mean():.2f} s per image (min {times.min():.2f}, max {times.max():.2f}, {len(times)} "
          f"images), {1 / times.mean():.2f} images/s")
    return times


if __name__ == "__main__":
    run_main(main)
