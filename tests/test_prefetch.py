"""Prefetcher: the next batch made one call ahead, on a second stream on CUDA. The CUDA tests run where a GPU
is present (gpu_checks.sh runs this file there)."""
import pytest
import torch

import engine
import run_training
from common import make_generator
from cudagraphs import GraphedCall
from cutpaste import make_batch
from prefetch import Prefetcher

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _images(device, n=6, size=64):
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8).to(device)


def _eager(images, variant, seed, count):
    gen = make_generator(images.device, seed)
    return [make_batch(images, variant, 4, gen) for _ in range(count)], gen


def _assert_same(batches, expected):
    assert len(batches) == len(expected)
    for (x, y), (xe, ye) in zip(batches, expected):
        assert torch.equal(x, xe) and torch.equal(y, ye)


def test_disabled_prefetcher_is_a_plain_call():
    images = _images(torch.device("cpu"))
    gen = make_generator(images.device, 3)
    feed = Prefetcher(lambda: make_batch(images, "3way", 4, gen), images.device, gen, enabled=False)
    batches = [feed(), feed()]
    expected, after_two = _eager(images, "3way", 3, 2)
    assert torch.equal(gen.get_state(), after_two.get_state()), "nothing drawn ahead"
    _assert_same(batches, expected)


def _feed(images, variant, seed, graphed=True):
    gen = make_generator(images.device, seed)
    make = GraphedCall(lambda: make_batch(images, variant, 4, gen), images.device, (gen,), graphed)
    return Prefetcher(make, images.device, gen), gen


def _check_rewind(images, graphed):
    feed, gen = _feed(images, "3way", 7, graphed)
    batches = [feed(), feed()]
    _, after_three = _eager(images, "3way", 7, 3)
    assert torch.equal(gen.get_state(), after_three.get_state()), "the third batch is made ahead"
    feed.rewind()
    # What a training state saved now holds: the generator after the two batches handed out.
    _, after_two = _eager(images, "3way", 7, 2)
    assert torch.equal(gen.get_state(), after_two.get_state())
    batches += [feed(), feed()]
    expected, after_four = _eager(images, "3way", 7, 4)
    _assert_same(batches, expected)
    feed.rewind()
    assert torch.equal(gen.get_state(), after_four.get_state())


def test_prefetched_batches_and_rewind_on_the_cpu():
    images = _images(torch.device("cpu"))
    feed, _ = _feed(images, "normal", 5)
    assert feed.stream is None, "no stream off CUDA: the batch is made ahead on the caller's thread"
    _assert_same([feed() for _ in range(3)], _eager(images, "normal", 5, 3)[0])
    _check_rewind(images, graphed=True)


@needs_cuda
@pytest.mark.parametrize("graphed", [True, False])
@pytest.mark.parametrize("variant", ["normal", "3way"])
def test_prefetched_batches_are_the_plain_calls_batches(variant, graphed):
    images = _images(torch.device("cuda"))
    feed, _ = _feed(images, variant, 5, graphed)
    assert feed.stream is not None
    # The main stream reads each batch at once: a missing wait for the side stream would read it half written.
    batches = [tuple(t.clone() for t in feed()) for _ in range(5)]
    _assert_same(batches, _eager(images, variant, 5, 5)[0])


@needs_cuda
@pytest.mark.parametrize("graphed", [True, False])
def test_rewind_on_cuda(graphed):
    _check_rewind(_images(torch.device("cuda")), graphed)


def test_training_with_and_without_prefetch_gives_the_same_model(tmp_path, mvtec_root):
    def train(name, *extra):
        (path,) = run_training.main(["--data_dir", str(mvtec_root), "--type", "lid", "--variant", "3way",
                                     "--no-pretrained", "--size", "32", "--epochs", "5", "--batch_size", "4",
                                     "--workers", "0", "--save_every", "2", "--model_dir", str(tmp_path / name),
                                     "--log_dir", str(tmp_path / f"{name}_logs"), *extra])
        return engine.read_checkpoint(path)["state_dict"]

    ahead, plain = train("ahead"), train("plain", "--no-prefetch")
    assert ahead.keys() == plain.keys()
    for key in ahead:
        assert torch.equal(ahead[key], plain[key]), key
