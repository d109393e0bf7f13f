"""The training loop behind run_training.py (Li et al., CVPR 2021, sections 3 and 4.1): one CutPaste model per
category, with training states for --resume, tensorboard scalars and a results table."""
import datetime
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

import dataset
import density as density_lib
from common.errors import CutPasteError
from common.paper import MIN_PATCH_SIZE, PATCH_SCORE_STRIDE, SGD_MOMENTUM, WEIGHT_DECAY
from cutpaste import VARIANT_CLASSES, make_batch
from evaluation import metrics
from localization import patches
from model import backbone_names
from scoring import inference
from scoring.scorer import fit_scorer
from storage import checkpoints, files
from training import cudagraphs, distributed, pretrained, records, runstate
from training.devices import choose, describe, embed_images, make_generator, memory_format, resolve_device

# --optim adam, beside the paper's SGD: torch's usual betas.
ADAM_BETAS = (0.9, 0.999)
# Stride of the test patches when --test_epochs monitors a patch-level model: coarse, to stay cheap.
MONITOR_STRIDE = 16


def check_args(args) -> None:
    if args.arch not in backbone_names():
        raise CutPasteError(f"--arch {args.arch} is not a torchvision classification model; try resnet18, "
                            f"resnet50 or efficientnet_b0 ... efficientnet_b4")
    for name in ("epochs", "batch_size", "size", "head_layer", "log_every"):
        if getattr(args, name) < (0 if name == "head_layer" else 1):
            raise CutPasteError(f"--{name} {getattr(args, name)} is out of range; give a positive number")
    if not args.lr > 0:
        raise CutPasteError(f"--lr {args.lr} is out of range; give a positive learning rate (paper: 0.03)")
    if args.workers < 0:
        raise CutPasteError(f"--workers {args.workers} is negative; give 0 or more")
    if args.save_every < 0:
        raise CutPasteError(f"--save_every {args.save_every} is negative; give 0 (save only on Ctrl-C) or more")
    if not 0 <= args.patch_size <= args.size:
        raise CutPasteError(f"--patch_size {args.patch_size} must be 0 (whole images) or at most --size {args.size}")
    if 0 < args.patch_size < MIN_PATCH_SIZE:
        raise CutPasteError(f"--patch_size {args.patch_size} is below {MIN_PATCH_SIZE}: ResNet18 "
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
    values = torch.stack([torch.stack([loss, acc]) for _, loss, acc, _ in pending]).cpu().tolist()
    for (loss, acc), (step, _, _, lr) in zip(values, pending):
        if not math.isfinite(loss):
            raise CutPasteError(f"{category}: the loss became {loss} at step {step}; lower --lr or try "
                                f"--no-amp (no checkpoint was written for {category})")
        for tag, value in (("loss", loss), ("acc", acc), ("lr", lr)):
            writer.add_scalar(tag, value, step)
    pending.clear()
    writer.flush()
    return values[-1][0]


def test_auroc(model, train_u8, test_set, device, args) -> float:
    """Image AUROC on the test set by a Scorer fitted on the clean training images (monitoring only); a patch-level
    model at a coarse stride, to keep monitoring cheap."""
    was_training = model.training
    settings = inference.Settings(device, "eager", args.amp, args.channels_last)
    scorer, _ = fit_scorer(model, train_u8, settings, args.patch_size, MONITOR_STRIDE)
    scores = inference.runner(scorer, settings)(test_set.images.cpu())[0]
    model.train(was_training)
    return metrics.image_auroc(test_set.labels, scores)


def prepare_model(args, device: torch.device):
    model = checkpoints.build_model(args.head_layer, VARIANT_CLASSES[args.variant], args.arch)
    if args.pretrained:
        pretrained.load_imagenet_backbone(model)
    return model.to(device, memory_format=memory_format(args.channels_last))


@dataclass
class Run:
    """One category's training in progress: what a step and a saved training state need."""
    args: object
    category: str
    name: str
    device: torch.device
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: object
    gen: torch.Generator
    writer: records.RunLog | None = None

    @property
    def state_path(self) -> Path:
        return runstate.state_path(self.args.model_dir, self.category)

    def save(self, step: int) -> None:
        state = runstate.capture(step, self.name, self.category, self.args, self.model, self.opt, self.sched,
                                 self.gen, self.device)
        runstate.save_state(state, self.state_path)


def claim_name(args, name: str) -> bool:
    """Take `name` for a new run by creating its log folder, which only one process can do."""
    if (args.model_dir / f"{name}.tch").exists():
        return False
    try:
        (args.log_dir / name).mkdir(parents=True)
    except FileExistsError:
        return False
    return True


def start_run(run: Run, world: distributed.World) -> int:
    """Name the run and open its log: a fresh run, or with --resume the saved state's, restored; the first step."""
    args, path = run.args, run.state_path
    state = runstate.load_state(path, args) if args.resume else None
    if state is None:
        if path.exists():
            print(f"note: {path} holds an interrupted run of {run.category}; this new run will overwrite it "
                  f"(--resume continues it)")
        run.name, start = f"model-{run.category}-{datetime.datetime.now():%Y-%m-%d_%H_%M_%S}", 0
        while not claim_name(args, run.name):
            run.name += "_"  # a second run within the same second must not overwrite the first
    else:
        run.name = state["run_name"]
        start = runstate.restore(state, path, run.model, run.opt, run.sched, run.gen, run.device)
        print(f"{run.category}: resuming {run.name} at step {start} of {args.epochs}")
    env = records.environment(run.device, world.rank, world.world_size)
    run.writer = records.RunLog(args.log_dir / run.name, args, env, start)
    return start


def finish_category(run: Run, train_u8: torch.Tensor) -> Path:
    """Fit the density on the clean training embeddings, write the checkpoint, drop the training state."""
    args, model, device = run.args, run.model, run.device
    model.freeze_backbone(False)
    extra = {}
    if args.patch_size:  # the Gaussian of a patch-level model is fitted on patches of the clean images
        embedder = patches.PatchEmbedder(model, device, args.amp, args.channels_last)
        fitted = patches.embed_cells(embedder, train_u8, args.patch_size)
        density, train_scores = patches.fit_patch_density(fitted, len(train_u8))
        extra["heldout_scores"] = patches.heldout_map_maxima(embedder, train_u8, args.patch_size, PATCH_SCORE_STRIDE,
                                                             fitted)
        extra["score_stride"] = PATCH_SCORE_STRIDE  # predict.py scores at the stride its threshold comes from
    else:
        train_emb = embed_images(model, train_u8, device, args.amp, args.channels_last)
        density, train_scores = density_lib.fit_and_score(train_emb, train_emb)
        extra["heldout_scores"] = density_lib.heldout_scores(train_emb)  # predict.py's threshold
    ckpt = checkpoints.make_checkpoint(model, args, run.category, args.epochs, density, train_scores, **extra)
    path = args.model_dir / f"{run.name}.tch"
    try:
        files.atomic_save(ckpt, path)
    except OSError as err:
        kept = f"the trained state stays in {run.state_path}: free space and rerun with --resume" \
            if run.state_path.exists() else "free space and train it again"
        raise CutPasteError(f"could not write checkpoint {path} ({err}); {kept}") from None
    run.state_path.unlink(missing_ok=True)
    return path


def batch_source(args, train_u8: torch.Tensor, gen: torch.Generator, device: torch.device):
    """A callable returning each step's (x, y) of patches (section 4.2) or whole images; a CUDA graph on CUDA."""
    def make():
        if args.patch_size:
            return patches.make_patch_batch(train_u8, args.variant, args.batch_size, args.patch_size, gen)
        return make_batch(train_u8, args.variant, args.batch_size, gen)
    return cudagraphs.GraphedCall(make, device, (gen,), args.cuda_graph)


def run_steps(run: Run, start: int, train_u8: torch.Tensor, test_set, stop) -> tuple[float, float]:
    """Steps `start` to --epochs with scalars and monitoring; returns (last loss, last AUROC). The state is saved
    every --save_every steps, on a stop request and at the end, so a failed run loses at most --save_every steps."""
    args, model = run.args, run.model
    step_model = torch.compile(model) if args.compile else model
    freeze = args.pretrained and args.freeze_resnet > 0
    model.freeze_backbone(freeze and start < args.freeze_resnet)
    next_batch = batch_source(args, train_u8, run.gen, run.device)
    pending, last_loss, auroc, saved_at = [], float("nan"), float("nan"), start if args.resume else -1
    bar = tqdm(range(start, args.epochs), initial=start, total=args.epochs, desc=f"train {run.category}",
               dynamic_ncols=True)
    for step in bar:
        if freeze and step == args.freeze_resnet:
            model.freeze_backbone(False)
        x, y = next_batch()
        lr = run.opt.param_groups[0]["lr"]
        x = x.contiguous(memory_format=memory_format(args.channels_last))
        pending.append((step, *train_step(step_model, run.opt, run.sched, x, y, run.device, args.amp), lr))
        if len(pending) >= args.log_every or step == args.epochs - 1:
            last_loss = flush_scalars(run.writer, pending, run.category)
            bar.set_postfix(loss=f"{last_loss:.4f}")
        if test_set is not None and (step + 1) % args.test_epochs == 0:
            auroc = test_auroc(model, train_u8, test_set, run.device, args)
            run.writer.add_scalar("test_image_auroc", auroc, step)
        stopping = stop is not None and stop.requested
        if stopping or (args.save_every and (step + 1) % args.save_every == 0):
            last_loss = flush_scalars(run.writer, pending, run.category) if pending else last_loss
            run.save(step + 1)
            saved_at = step + 1
            if stopping:
                raise runstate.Interrupted(f"{run.category} stopped at step {step + 1} of {args.epochs}; its state "
                                           f"is in {run.state_path}: rerun with --resume to continue")
    if args.save_every and saved_at != args.epochs:
        run.save(args.epochs)
    return last_loss, auroc


def train_category(args, category: str, device: torch.device, stop: runstate.StopRequest | None = None,
                   world: distributed.World = distributed.World()) -> dict:
    train_u8 = dataset.MVTecTrain(args.data_dir, category, args.size, args.workers, args.layout).images.to(device)
    test_set = (dataset.MVTecTest(args.data_dir, category, args.size, args.workers, args.layout)
                if args.test_epochs > 0 else None)
    torch.manual_seed(args.seed)  # weights; the augmentation draws from its own generator
    model = prepare_model(args, device)
    opt, sched = make_optimizer(model, args, args.epochs)
    run = Run(args, category, "", device, model, opt, sched, make_generator(device, args.seed))
    with runstate.category_lock(args.model_dir, category):
        start = start_run(run, world)
        try:
            last_loss, auroc = run_steps(run, start, train_u8, test_set, stop)
            path = finish_category(run, train_u8)
        finally:
            run.writer.close()
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
    shown = frame.drop(columns=["error"]).astype(object).fillna("")
    print(f"training results ({model_dir / 'train_results.csv'}):\n{shown.to_string(index=False)}")
    try:
        files.write_csv(frame, model_dir / "train_results.csv")
        files.atomic_write(model_dir / "train_results.md", lambda fh: fh.write(shown.to_markdown(index=False)
                                                                                     + "\n"), "w")
    except OSError as err:
        print(f"warning: could not write the results table into {model_dir} ({err}); the table above is its "
              f"only copy", file=sys.stderr)
    return frame


def raise_failures(rows: list[dict], model_dir: Path) -> None:
    failed = [row for row in rows if row["status"] == "failed"]
    if len(failed) == 1 and len(rows) == 1:
        raise CutPasteError(failed[0]["error"])
    if failed:
        raise CutPasteError(f"{len(failed)} of {len(rows)} categories failed: "
                            + "; ".join(f"{row['category']} ({row['error']})" for row in failed)
                            + f"; the others' checkpoints are in {model_dir}")


def run(args) -> list[Path]:
    """run_training.py: train this rank's share, write the table on rank 0; returns the checkpoints made or found."""
    check_args(args)
    world = distributed.setup()
    try:
        device = distributed.rank_device(resolve_device(args.device, args.cuda), world)
        choose(args, device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        categories = dataset.resolve_categories(args.data_dir, args.type, args.layout)
        print(dataset.describe(args.data_dir, categories, args.layout))
        files.writable_folder(args.model_dir, "--model_dir")
        files.writable_folder(args.log_dir, "--log_dir")
        rank = f"rank {world.rank} of {world.world_size}: " if world.world_size > 1 else ""
        print(f"{rank}training {', '.join(distributed.shard(categories, world)) or 'nothing'} on "
              f"{describe(device, args.amp, args.channels_last)} (variant {args.variant}, {args.epochs} steps)")
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
