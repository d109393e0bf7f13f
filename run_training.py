"""Train one CutPaste model per MVTec AD category (Li et al., CVPR 2021, sections 3 and 4.1).

    python run_training.py --model_dir models --head_layer 2
"""
import argparse
import datetime
import math
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

import calibration
import cudagraphs
import dataset
import distributed
import engine
import records
import runstate
import localization
import prefetch
from common import (CutPasteError, bf16_supported, keep_freed_memory, make_generator, resolve_device,
                    run_main, seed_everything)
from cutpaste import VARIANT_CLASSES, VARIANTS, make_batch
from model import DEFAULT_ARCH, backbone_names

# Section 4.1: SGD with momentum 0.9, weight decay 3e-5 (the paper's lr, 0.03, is --lr's default).
SGD_MOMENTUM = 0.9
WEIGHT_DECAY = 3e-5
ADAM_BETAS = (0.9, 0.999)
# Stride of the test patches when --test_epochs monitors a patch-level model: coarse, to stay cheap.
MONITOR_STRIDE = 16


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train CutPaste models, one per category.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", type=Path, default=Path("Data"), help="MVTec AD root folder")
    p.add_argument("--type", type=str, default="all",
                   help="comma-separated categories, or 'all' for every category present in --data_dir")
    p.add_argument("--model_dir", type=Path, default=Path("models"), help="where checkpoints are written")
    p.add_argument("--log_dir", type=Path, default=Path("logdirs"), help="tensorboard logs and run arguments")
    p.add_argument("--variant", type=str, choices=VARIANTS, default="3way",
                   help="CutPaste variant (paper section 3): normal, scar, union (2 classes) or 3way")
    p.add_argument("--epochs", type=int, default=256,
                   help="number of optimizer steps (Li et al. call 256 steps one 'epoch'; --epochs counts steps)")
    p.add_argument("--test_epochs", type=int, default=-1,
                   help="every this many steps log the test-set image AUROC to tensorboard (monitoring only, "
                        "never used to pick a checkpoint); -1 disables")
    p.add_argument("--batch_size", type=int, default=32,
                   help="clean images per step; each gets 1 (2 for 3way) augmented copies, so 32 gives the "
                        "paper's batch of 64 (96 for 3way)")
    p.add_argument("--lr", type=float, default=0.03, help="learning rate, cosine-annealed over the steps (paper: 0.03)")
    p.add_argument("--optim", type=str, choices=("sgd", "adam"), default="sgd",
                   help=f"optimizer: sgd (paper: momentum {SGD_MOMENTUM}, weight decay {WEIGHT_DECAY}) or adam")
    p.add_argument("--arch", type=str, default=DEFAULT_ARCH,
                   help="backbone: any torchvision classification model by name, e.g. resnet18 (paper), resnet50, "
                        "efficientnet_b0 ... efficientnet_b4")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from torchvision's ImageNet weights of --arch (paper: ResNet18); --no-pretrained "
                        "from scratch")
    p.add_argument("--freeze_resnet", type=int, default=20,
                   help="with --pretrained, train only the head for this many first steps")
    p.add_argument("--head_layer", type=int, default=1,
                   help="number of 512-wide layers in the projection head (then 128, then the output)")
    p.add_argument("--size", type=int, default=256, help="images are resized to size x size (paper: 256)")
    p.add_argument("--patch_size", type=int, default=0,
                   help="train a patch-level model on random patch_size x patch_size crops, CutPaste inside each "
                        f"(paper section 4.2: {localization.PAPER_PATCH_SIZE} of 256); 0 trains on whole images")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, sampling and augmentation")
    p.add_argument("--workers", type=int, default=4, help="threads that decode images (0: the main thread)")
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when available)")
    p.add_argument("--cuda", type=str, default=None, help="legacy: --cuda 1 means --device cuda")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast; default: on where the device runs bf16 natively")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels-last memory format (faster convolutions on CPU and CUDA)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="wrap the training model in torch.compile")
    p.add_argument("--cuda_graph", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, replay each step's augmentation from a CUDA graph: one launch instead of about "
                        "1300 operations (3-way) launched one by one, the same random draws (default: on; ignored on "
                        "other devices)")
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True,
                   help="make each step's batch one step ahead, the same batches in the same order; on CUDA on a "
                        "second stream, so that it is made while the current step trains (default: on)")
    p.add_argument("--keep_freed_memory", action=argparse.BooleanOptionalAction, default=True,
                   help="on the CPU, have glibc's malloc keep freed memory for the next step instead of mapping "
                        "fresh pages (about 15%% faster steps, about 0.5 GB more memory; default: on)")
    p.add_argument("--log_every", type=int, default=32,
                   help="steps between reads of the loss from the device (tensorboard still gets every step)")
    p.add_argument("--save_every", type=int, default=256,
                   help="steps between saved training states (<model_dir>/<category>.state.pt) that --resume "
                        "continues from; 0: save only on Ctrl-C")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue each category from its saved training state (same settings required), and "
                        "skip categories already finished with these settings")
    p.add_argument("--retrain", action=argparse.BooleanOptionalAction, default=False,
                   help="train categories again even when --model_dir holds a finished checkpoint with these "
                        "settings (without it, --type all and --resume skip them)")
    return p


def check_args(args) -> None:
    if args.arch not in backbone_names():
        raise CutPasteError(f"--arch {args.arch} is not a torchvision classification model; try resnet18, "
                            f"resnet50 or efficientnet_b0 ... efficientnet_b4")
    for name in ("epochs", "batch_size", "size", "head_layer", "log_every"):
        if getattr(args, name) < (0 if name == "head_layer" else 1):
            raise CutPasteError(f"--{name} {getattr(args, name)} is out of range; give a positive number")
    if args.workers < 0:
        raise CutPasteError(f"--workers {args.workers} is negative; give 0 or more")
    if args.save_every < 0:
        raise CutPasteError(f"--save_every {args.save_every} is negative; give 0 (save only on Ctrl-C) or more")
    if not 0 <= args.patch_size <= args.size:
        raise CutPasteError(f"--patch_size {args.patch_size} must be 0 (whole images) or at most --size {args.size}")
    if 0 < args.patch_size < localization.MIN_PATCH_SIZE:
        raise CutPasteError(f"--patch_size {args.patch_size} is below {localization.MIN_PATCH_SIZE}: ResNet18 "
                            f"downsamples 32x, so smaller patches shrink to one pixel before its last block")


def make_optimizer(model, args, steps: int):
    if args.optim == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=SGD_MOMENTUM, weight_decay=WEIGHT_DECAY)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)


def train_step(model, opt, sched, x, y, device, amp: bool):
    """One optimizer step; returns (loss, accuracy) as device tensors (no host synchronisation)."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
        _, logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    opt.step()
    sched.step()
    return loss.detach(), (logits.argmax(1) == y).float().mean()


def flush_scalars(writer, pending: list, category: str) -> float:
    """Write buffered (step, loss, acc, lr) to tensorboard with one device read; stop on a non-finite loss."""
    steps = [s for s, _, _, _ in pending]
    values = torch.stack([torch.stack([loss, acc]) for _, loss, acc, _ in pending]).cpu().tolist()
    for step, (loss, acc), (_, _, _, lr) in zip(steps, values, pending):
        if not math.isfinite(loss):
            raise CutPasteError(f"{category}: the loss became {loss} at step {step}; lower --lr or try "
                                f"--no-amp (no checkpoint was written for {category})")
        writer.add_scalar("loss", loss, step)
        writer.add_scalar("acc", acc, step)
        writer.add_scalar("lr", lr, step)
    pending.clear()
    writer.flush()
    return values[-1][0]


def test_auroc(model, train_u8, test_set, device, args) -> float:
    """Image AUROC on the test set with a density fitted on the clean training images (monitoring only)."""
    if args.patch_size:  # maximum of a coarse anomaly map, to keep monitoring cheap
        runner = localization.Runner(model, device, args.amp, args.channels_last)
        maps = localization.dense_maps(runner, train_u8, test_set.images, args.patch_size, MONITOR_STRIDE)
        return engine.image_auroc(test_set.labels, maps.amax(dim=(1, 2)))
    train_emb = engine.embed_images(model, train_u8, device, args.amp, args.channels_last)
    test_emb = engine.embed_images(model, test_set.images, device, args.amp, args.channels_last)
    _, scores = engine.fit_and_score(train_emb, test_emb)
    return engine.image_auroc(test_set.labels, scores)


def prepare_model(args, device: torch.device):
    model = engine.build_model(args.head_layer, VARIANT_CLASSES[args.variant], args.arch)
    if args.pretrained:
        engine.load_imagenet_backbone(model)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    return model.to(device, memory_format=fmt)


def start_run(args, category: str, device: torch.device, model, opt, sched, gen, world: distributed.World):
    """(run name, first step, run log): a fresh run, or with --resume the saved state's run, restored."""
    path = runstate.state_path(args.model_dir, category)
    state = runstate.load_state(path, args) if args.resume else None
    if state is None:
        if path.exists():
            print(f"note: {path} holds an interrupted run of {category}; this new run will overwrite it "
                  f"(--resume continues it)")
        name, start = f"model-{category}-{datetime.datetime.now():%Y-%m-%d_%H_%M_%S}", 0
        while (args.model_dir / f"{name}.tch").exists() or (args.log_dir / name).exists():
            name += "_"  # a second run within the same second (e.g. --retrain) must not overwrite the first
    else:
        name, start = state["run_name"], runstate.restore(state, path, model, opt, sched, gen, device)
        print(f"{category}: resuming {name} at step {start} of {args.epochs}")
    env = records.environment(device, world.rank, world.world_size)
    return name, start, records.RunLog(args.log_dir / name, args, env, start)


def finish_category(args, category: str, name: str, model, train_u8, device: torch.device, has_state: bool) -> Path:
    """Fit the density on the clean training embeddings, write the checkpoint, drop the training state."""
    model.freeze_backbone(False)
    extra = {}
    if args.patch_size:  # the Gaussian of a patch-level model is fitted on patches of the clean images
        runner = localization.Runner(model, device, args.amp, args.channels_last)
        density, train_scores = localization.fit_patch_density(runner, train_u8, args.patch_size)
    else:
        train_emb = engine.embed_images(model, train_u8, device, args.amp, args.channels_last)
        density, train_scores = engine.fit_and_score(train_emb, train_emb)
        extra["heldout_scores"] = calibration.heldout_scores(train_emb)  # predict.py's threshold
    ckpt = {**engine.make_checkpoint(model, args, category, args.epochs, density, train_scores), **extra}
    path = args.model_dir / f"{name}.tch"
    state = runstate.state_path(args.model_dir, category)
    try:
        engine.save_checkpoint(ckpt, path)
    except OSError as err:
        kept = f"the trained state stays in {state}: free space and rerun with --resume" if has_state else \
            "free space and train it again"
        raise CutPasteError(f"could not write checkpoint {path} ({err}); {kept}") from None
    state.unlink(missing_ok=True)
    return path


def batch_source(args, train_u8: torch.Tensor, gen: torch.Generator, device: torch.device) -> prefetch.Prefetcher:
    """A callable that returns each step's (x, y), of patches (section 4.2) or whole images: replayed from a CUDA
    graph on CUDA unless --no-cuda_graph, made one step ahead unless --no-prefetch."""
    def patches():
        return localization.make_patch_batch(train_u8, args.variant, args.batch_size, args.patch_size, gen)

    def images():
        return make_batch(train_u8, args.variant, args.batch_size, gen)

    make = cudagraphs.GraphedCall(patches if args.patch_size else images, device, (gen,), args.cuda_graph)
    return prefetch.Prefetcher(make, device, gen, args.prefetch)


def train_category(args, category: str, device: torch.device, stop: runstate.StopRequest | None = None,
                   world: distributed.World = distributed.World()) -> dict:
    """Train (or resume) one category and write its checkpoint; return its summary row.

    Every --save_every steps, on a stop request (Ctrl-C) and after the last step the training
    state is saved atomically, so an interrupted or failed run loses at most --save_every steps.
    """
    train = dataset.MVTecTrain(args.data_dir, category, args.size, args.workers)
    test_set = dataset.MVTecTest(args.data_dir, category, args.size, args.workers) if args.test_epochs > 0 else None
    train_u8 = train.images.to(device)
    seed_everything(args.seed)
    gen = make_generator(device, args.seed)
    model = prepare_model(args, device)
    step_model = torch.compile(model) if args.compile else model
    opt, sched = make_optimizer(model, args, args.epochs)
    name, start, writer = start_run(args, category, device, model, opt, sched, gen, world)
    state_path, saved_at = runstate.state_path(args.model_dir, category), start if args.resume else -1
    freeze = args.pretrained and args.freeze_resnet > 0
    model.freeze_backbone(freeze and start < args.freeze_resnet)
    pending, last_loss, auroc = [], float("nan"), float("nan")
    next_batch = batch_source(args, train_u8, gen, device)
    bar = tqdm(range(start, args.epochs), initial=start, total=args.epochs, desc=f"train {category}",
               dynamic_ncols=True)
    for step in bar:
        if freeze and step == args.freeze_resnet:
            model.freeze_backbone(False)
        x, y = next_batch()
        x = x.contiguous(memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
        lr = opt.param_groups[0]["lr"]
        loss, acc = train_step(step_model, opt, sched, x, y, device, args.amp)
        pending.append((step, loss, acc, lr))
        if len(pending) >= args.log_every or step == args.epochs - 1:
            last_loss = flush_scalars(writer, pending, category)
            bar.set_postfix(loss=f"{last_loss:.4f}")
        if test_set is not None and (step + 1) % args.test_epochs == 0:
            auroc = test_auroc(model, train_u8, test_set, device, args)
            writer.add_scalar("test_image_auroc", auroc, step)
        if (stop is not None and stop.requested) or (args.save_every and (step + 1) % args.save_every == 0):
            last_loss = flush_scalars(writer, pending, category) if pending else last_loss
            next_batch.rewind()  # the saved generator must not count the batch made ahead for the next step
            runstate.save_state(runstate.capture(step + 1, name, category, args, model, opt, sched, gen, device),
                                state_path)
            saved_at = step + 1
            if stop is not None and stop.requested:
                writer.close()
                raise runstate.Interrupted(f"{category} stopped at step {step + 1} of {args.epochs}; its state is "
                                           f"in {state_path}: rerun with --resume to continue")
    next_batch.rewind()
    if args.save_every and saved_at != args.epochs:
        runstate.save_state(runstate.capture(args.epochs, name, category, args, model, opt, sched, gen, device),
                            state_path)
    try:
        path = finish_category(args, category, name, model, train_u8, device, state_path.exists())
    finally:
        writer.close()
    print(f"{category}: saved {path} (last loss {last_loss:.4f})")
    return {"category": category, "checkpoint": str(path), "last_loss": last_loss, "test_image_auroc": auroc}


def train_all(args, categories: list[str], device: torch.device, world: distributed.World) -> list[dict]:
    """Train this rank's share of the categories; one that fails is recorded and the others go on."""
    skip = (args.type == "all" or args.resume) and not args.retrain
    finished = runstate.finished_checkpoints(args.model_dir, args) if skip else {}
    rows = []
    with runstate.StopRequest() as stop:
        for cat in distributed.shard(categories, world):
            row = {"category": cat, "rank": world.rank, "device": str(device)}
            started = time.perf_counter()
            if cat in finished:
                print(f"{cat}: already finished with these settings ({finished[cat].name}); skipped "
                      f"(--retrain trains it again)")
                row.update(status="skipped", checkpoint=str(finished[cat]))
            else:
                try:
                    row.update(status="trained", **train_category(args, cat, device, stop, world))
                except CutPasteError as err:
                    print(f"{cat} failed: {err}", file=sys.stderr)
                    row.update(status="failed", error=str(err))
            rows.append({**row, "seconds": round(time.perf_counter() - started, 1)})
            if stop.requested:
                raise runstate.Interrupted(f"stopped after {cat}; rerun the same command with --resume to go on")
    return rows


RESULT_COLUMNS = ("category", "status", "rank", "device", "seconds", "last_loss", "test_image_auroc",
                  "checkpoint", "error")


def write_results(rows: list[dict], categories: list[str], model_dir: Path) -> pd.DataFrame:
    """train_results.csv and .md in --model_dir: one row per category, from every rank."""
    frame = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    frame = frame.sort_values("category", key=lambda c: c.map(categories.index), kind="stable")
    model_dir.mkdir(parents=True, exist_ok=True)
    frame.to_csv(model_dir / "train_results.csv", index=False)
    shown = frame.drop(columns=["error"]).astype(object).fillna("")
    (model_dir / "train_results.md").write_text(shown.to_markdown(index=False) + "\n")
    print(f"training results ({model_dir / 'train_results.csv'}):\n{shown.to_string(index=False)}")
    return frame


def raise_failures(rows: list[dict], model_dir: Path) -> None:
    failed = [row for row in rows if row["status"] == "failed"]
    if len(failed) == 1 and len(rows) == 1:
        raise CutPasteError(failed[0]["error"])
    if failed:
        raise CutPasteError(f"{len(failed)} of {len(rows)} categories failed: "
                            + "; ".join(f"{row['category']} ({row['error']})" for row in failed)
                            + f"; the others' checkpoints are in {model_dir}")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    check_args(args)
    world = distributed.setup()
    try:
        device = distributed.rank_device(resolve_device(args.device, args.cuda), world)
        if args.amp is None:
            args.amp = bf16_supported(device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if device.type == "cpu" and args.keep_freed_memory:
            keep_freed_memory()
        categories = dataset.resolve_categories(args.data_dir, args.type)
        rank = f"rank {world.rank} of {world.world_size}: " if world.world_size > 1 else ""
        print(f"{rank}training {', '.join(distributed.shard(categories, world)) or 'nothing'} on {device} "
              f"(variant {args.variant}, {args.epochs} steps, bf16 autocast {'on' if args.amp else 'off'})")
        try:
            rows = train_all(args, categories, device, world)
        except runstate.Interrupted as err:
            print(f"interrupted: {err}", file=sys.stderr)
            sys.exit(130)
        table = distributed.gather_rows(rows, world)
        if table is not None:
            write_results(table, categories, args.model_dir)
    finally:
        distributed.teardown(world)
    raise_failures(table if table is not None else rows, args.model_dir)
    return [Path(row["checkpoint"]) for row in rows if isinstance(row.get("checkpoint"), str)]


if __name__ == "__main__":
    run_main(main)
