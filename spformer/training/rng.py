"""Randomness that does not depend on how a run was cut: seeds from keys, and data loading that leaves the
training loop's RNGs alone.

A sample's augmentation is seeded by a key such as (seed, epoch, index) (:func:`seeded_rngs`), never by the
process-wide RNGs, the number of loader workers or where a run stopped; drop path and Mixup draw from the
process RNGs, which checkpoints save, and which iterating a loader (:func:`rng_isolated`) does not move. So a
resumed run repeats an uninterrupted one.
"""
import contextlib
import random

import numpy as np
import torch


def key_seed(*key: int) -> int:
    """One 32-bit seed from a key such as (seed, epoch, index), through numpy's SeedSequence: distinct keys
    give unrelated seeds (a sum would give (seed 43, epoch 0) the stream of (seed 42, epoch 1))."""
    return int(np.random.SeedSequence([k & 0xFFFFFFFF for k in key]).generate_state(1)[0])


@contextlib.contextmanager
def seeded_rngs(*key: int):
    """Seed the python, numpy and torch CPU RNGs (timm's transforms draw from all three) from `key` inside
    the block; restore them afterwards, so that loading data never moves the training loop's RNGs."""
    seed = key_seed(*key)
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def rng_isolated(loader):
    """Iterate `loader` without disturbing the torch CPU RNG of the training loop: starting a DataLoader
    iterator draws a worker seed from it, which would make a resumed run diverge from an uninterrupted one."""
    iterator = iter(loader)
    try:
        while True:
            with torch.random.fork_rng(devices=[]):
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
            yield batch
    finally:
        getattr(iterator, 'close', lambda: None)()

