"""train_imagenet.py: the lr of every optimizer update, the parameter groups, the EMA decay, Mixup and label
smoothing, and the keys of the data (sample order and per-sample augmentation), each against an oracle
written here, not taken from the code under test.

Oracles:

* lr per update: timm's cosine schedule with linear warm-up stepped per update (CosineLRScheduler,
  t_in_epochs=False, one cycle, warm-up inside the schedule), written out in `expected_lr`: warm-up from
  --warmup-lr towards --lr over warmup_t = --warmup-epochs x U updates, cosine from --lr to --min-lr over
  T = --epochs x U updates counted from update 0, --min-lr from T on; U = ceil(batches per epoch /
  --grad-accum-steps). Every metrics row of a run (--log-interval 1) holds the lr its update used, so
  update n shows lr(n - 1). A run stopped mid-warm-up and resumed logs the same sequence.
* parameter groups (checkpoints' optimizer.bin): each group's lr is lr(n) x its layer-decay scale (a power
  of --layer-decay, the head's 1); the groups without weight decay hold exactly the 1-d parameters, the
  biases and the model's no_weight_decay() ones, the others --weight-decay (matched by shape multisets).
* EMA: between the checkpoints of updates n - 1 and n, ema_n - w_n = d (ema_{n-1} - w_n) with
  d = min(--model-ema-decay, 1 - n ** (-2/3)) (ModelEmaV3's warm-up: 1 - (1 + steps before) ** (-2/3)).
* Mixup / smoothing (each batch's targets, logits and loss, dumped by the run): an unmixed batch holds
  smoothed one-hot rows (s / C off, 1 - s + s / C on its own label), a mixed one a single lam per batch; with
  --mixup-prob 0.5 both kinds occur; the loss is the cross-entropy of the logits with those soft targets.
  Without Mixup (the two-process run) the loss is the cross-entropy with smoothed one-hot labels,
  (1 - s) x NLL + s x mean over classes of -log p.
* data keys: the order of an epoch is a permutation that depends only on (seed, epoch); the augmentation of a
  sample only on (seed, epoch, index): different for the 8 indices of one image in one epoch, the same when
  the key repeats (whatever the process RNGs hold), different in another epoch; and the run, with one
  process or two, loaded every sample once per epoch with exactly the tensor that this process computes for
  its key (sha256 of each augmented image, dumped before Mixup).

Runs (each a fresh process, as a user starts it; 28 images of 32 px, batch 4, 2 accumulation steps: 7 batches
and 4 updates per epoch, the last update of an epoch on one batch): one uninterrupted 3-epoch run, the same
stopped after 2 updates and resumed, and 2 processes (torchrun, gloo) for 2 epochs at batch 2, without Mixup,
with a loader worker each.
"""
import collections
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import spformer  # noqa: F401  (registers the spformer_* models with timm)

from test_train import MODEL, SCRIPT, free_port, make_shapes, read_jsonl, run, run_env, train_cmd

PER_CLASS, CLASSES = 7, 4
IMAGES = PER_CLASS * CLASSES  # 28: 7 batches of 4, every image used every epoch
BATCH, ACCUM, EPOCHS = 4, 2, 3
UPDATES_PER_EPOCH = math.ceil(IMAGES // BATCH / ACCUM)  # 4: updates of 2, 2, 2 and 1 batches
# None of these is a default of the script or of timm (a flag that is dropped shows); warm-up: 3 updates.
LR, WARMUP_LR, MIN_LR, WARMUP_EPOCHS = 1e-3, 2e-5, 2e-4, 0.75
LAYER_DECAY, WEIGHT_DECAY = 0.65, 0.03
SMOOTHING, MIXUP_PROB = 0.2, 0.5
CLIP_GRAD = 0.5  # below the tiny model's gradient norms at the start: most updates are clipped
EMA_DECAY = 0.7  # below the EMA warm-up's 1 - 9^(-2/3) = 0.77 at update 9, above its 0.60 at update 4
CHECKPOINT_EVERY = 3  # with the epoch ends: updates 3, 4, 6, 8, 9, 12; the pairs (3, 4) and (8, 9)


def recipe(data: Path, output: Path, *extra, lr_flags=('--lr', LR)) -> list:
    """The DeiT recipe of the script (RandAugment, random erasing, Mixup/CutMix, drop path, EMA), with layer
    decay, gradient clipping and every schedule value set apart from the others."""
    return ['--data-dir', data, '--model', MODEL, '--img-size', 32, '--batch-size', BATCH,
            '--grad-accum-steps', ACCUM, '--epochs', EPOCHS, *lr_flags, '--warmup-lr', WARMUP_LR,
            '--clip-grad', CLIP_GRAD, '--min-lr', MIN_LR, '--warmup-epochs', WARMUP_EPOCHS, '--layer-decay', LAYER_DECAY,
            '--weight-decay', WEIGHT_DECAY, '--smoothing', SMOOTHING, '--mixup-prob', MIXUP_PROB,
            '--model-ema-decay', EMA_DECAY, '--workers', 0, '--log-interval', 1, '--no-plot',
            '--checkpoint-every', CHECKPOINT_EVERY, '--keep-checkpoints', 0, '--output', output, *extra]


def expected_lr(t: float, updates_per_epoch: int = UPDATES_PER_EPOCH, epochs: int = EPOCHS) -> float:
    """The lr after t updates: timm's cosine-with-warm-up per update, written out (see the module docstring)."""
    warmup_t, total = WARMUP_EPOCHS * updates_per_epoch, epochs * updates_per_epoch
    if t < warmup_t:
        return WARMUP_LR + t * (LR - WARMUP_LR) / warmup_t
    if t >= total:
        return MIN_LR
    return MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * t / total))


def soft_cross_entropy(logits, targets) -> float:
    """Mean over the rows of -sum_c target_c log softmax(logits)_c, in float64."""
    logits, targets = torch.tensor(logits, dtype=torch.float64), torch.as_tensor(targets, dtype=torch.float64)
    return float((-targets * torch.log_softmax(logits, dim=1)).sum(1).mean())


def smoothed_one_hot(labels) -> torch.Tensor:
    off = SMOOTHING / CLASSES
    targets = torch.full((len(labels), CLASSES), off, dtype=torch.float64)
    targets[torch.arange(len(labels)), torch.as_tensor(labels).long()] = 1 - SMOOTHING + off
    return targets


def train_rows(out: Path) -> list:
    return [r for r in read_jsonl(out / 'metrics.jsonl') if r['kind'] == 'train']


def rank_dumps(dump: Path, n: int) -> list:
    return [json.loads((dump / f'rank{i}.json').read_text()) for i in range(n)]


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp('shapes'), n_train=PER_CLASS, n_val=2, size=32)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, data) -> dict:
    root = tmp_path_factory.mktemp('uninterrupted')
    proc = run(train_cmd(*recipe(data, root / 'run')), env=run_env(SPFORMER_TRAIN_TEST_DUMP=root / 'dump'))
    [dump] = rank_dumps(root / 'dump', 1)
    return dict(out=root / 'run', dump=dump, proc=proc)


@pytest.fixture(scope='module')
def resumed(tmp_path_factory, data) -> dict:
    """Stopped after update 2 (mid-warm-up, mid-epoch: 4 of 7 batches), then resumed to the end."""
    out = tmp_path_factory.mktemp('resumed') / 'run'
    stopped = run(train_cmd(*recipe(data, out, '--stop-after-steps', 2)))
    resumed = run(train_cmd(*recipe(data, out, '--resume', 'latest', '--checkpoint-every', 0)))
    return dict(out=out, stopped=stopped, resumed=resumed)


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory, data) -> dict:
    """2 processes x batch 2 x 2 accumulation steps: the same global batch, 7 batches per process per epoch;
    without Mixup (so the loss is LabelSmoothingCrossEntropy's), a loader worker process each. The lr is not
    given but follows the global batch: --lr-base x (2 x 2 x 2) / --lr-base-size = LR."""
    root = tmp_path_factory.mktemp('two_processes')
    run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', 2, '--master_addr', '127.0.0.1',
         '--master_port', free_port(), SCRIPT,
         *recipe(data, root / 'run', '--batch-size', 2, '--epochs', 2, '--checkpoint-every', 0,
                 '--keep-checkpoints', 1, '--no-model-ema', '--mixup', 0, '--cutmix', 0, '--workers', 1,
                 lr_flags=('--lr-base', LR * 64 / (2 * 2 * ACCUM), '--lr-base-size', 64))],
        env=run_env(ACCELERATE_USE_CPU=1, SPFORMER_TRAIN_TEST_DUMP=root / 'dump'))
    return dict(out=root / 'run', dumps=rank_dumps(root / 'dump', 2))


# ------------------------------------------------------------------------------------------------------------
# The lr of every update, the parameter groups, the EMA.
# ------------------------------------------------------------------------------------------------------------

def test_formula_reproduces_timms_documented_endpoints():
    # The oracle itself: starts at --warmup-lr, is linear in the warm-up, and reaches --min-lr at T.
    assert expected_lr(0) == WARMUP_LR
    assert expected_lr(1) - expected_lr(0) == pytest.approx(expected_lr(2) - expected_lr(1))
    assert expected_lr(EPOCHS * UPDATES_PER_EPOCH) == MIN_LR
    assert expected_lr(EPOCHS * UPDATES_PER_EPOCH / 2) == pytest.approx((LR + MIN_LR) / 2)


def test_every_update_uses_the_lr_of_the_cosine_schedule_with_warmup(uninterrupted):
    rows = train_rows(uninterrupted['out'])
    total = EPOCHS * UPDATES_PER_EPOCH
    assert [r['update'] for r in rows] == list(range(1, total + 1))
    # 4 updates per epoch although 7 batches do not split into pairs: the schedule's U is ceil(7 / 2).
    assert [r['epoch'] for r in rows] == [e for e in range(EPOCHS) for _ in range(UPDATES_PER_EPOCH)]
    assert f'{UPDATES_PER_EPOCH} updates/epoch x {EPOCHS} epochs' in uninterrupted['proc'].stdout
    logged = [r['lr'] for r in rows]
    expected = [expected_lr(n - 1) for n in range(1, total + 1)]
    # Exact up to rounding: a schedule stepped per epoch, one update late or early, or without --min-lr
    # differs by at least 1e-5 somewhere.
    assert logged == pytest.approx(expected, rel=1e-9, abs=0), \
        '\n'.join(f'update {n}: logged {a:.6g}, expected {b:.6g}' for n, (a, b) in enumerate(zip(logged, expected), 1))
    assert len(set(logged)) == total  # it moves at every update, not once per epoch


def test_checkpointed_groups_hold_the_scheduled_lr_layer_scales_and_weight_decay(uninterrupted):
    model = timm.create_model(MODEL, num_classes=CLASSES, img_size=32)
    params = dict(model.named_parameters())
    exempt = {n for n, p in params.items()
              if p.ndim <= 1 or n.endswith('.bias') or n in set(model.no_weight_decay())}
    assert any(params[n].ndim > 1 for n in exempt)  # the pos_embeds: exempt by name, not by shape
    shapes = lambda names: collections.Counter(tuple(params[n].shape) for n in names)  # noqa: E731
    steps = sorted(int(p.name.split('_')[1]) for p in (uninterrupted['out'] / 'checkpoints').iterdir())
    assert steps == [3, 4, 6, 8, 9, 12]
    for step in steps:
        optimizer_file = uninterrupted['out'] / 'checkpoints' / f'step_{step:08d}' / 'optimizer.bin'
        saved = torch.load(optimizer_file, weights_only=True, map_location='cpu')
        groups, state = saved['param_groups'], saved['state']
        # The scheduler has been stepped to `step`: every group at lr(step) x its layer-decay scale.
        scales = sorted({g['lr_scale'] for g in groups})
        for g in groups:
            assert g['lr'] == pytest.approx(expected_lr(step) * g['lr_scale'], rel=1e-9), (step, g['lr_scale'])
            k = math.log(g['lr_scale']) / math.log(LAYER_DECAY)
            assert abs(k - round(k)) < 1e-9, f'lr_scale {g["lr_scale"]} is not a power of {LAYER_DECAY}'
        assert scales[-1] == 1.0 and len(scales) >= 3, scales  # the head at the full lr, earlier layers less
        # Weight decay: by the shapes of the Adam moments of each group's parameters.
        no_decay = [tuple(state[i]['exp_avg'].shape) for g in groups if g['weight_decay'] == 0 for i in g['params']]
        decay = [tuple(state[i]['exp_avg'].shape) for g in groups if g['weight_decay'] != 0 for i in g['params']]
        assert {g['weight_decay'] for g in groups} == {0.0, WEIGHT_DECAY}
        assert collections.Counter(no_decay) == shapes(exempt), 'the groups without weight decay differ'
        assert collections.Counter(decay) == shapes(set(params) - exempt)


def test_ema_decay_follows_its_warmup_then_the_flag(uninterrupted):
    ckpt = uninterrupted['out'] / 'checkpoints'
    for n, decay in ((4, 1 - 4 ** (-2 / 3)), (9, EMA_DECAY)):
        before = load_file(str(ckpt / f'step_{n - 1:08d}' / 'model_ema.safetensors'))
        ema = load_file(str(ckpt / f'step_{n:08d}' / 'model_ema.safetensors'))
        weights = load_file(str(ckpt / f'step_{n:08d}' / 'model.safetensors'))
        aa = ab = bb = 0.
        for k in (k for k in ema if ema[k].is_floating_point()):  # parameters and float buffers
            a, b = (ema[k] - weights[k]).double(), (before[k] - weights[k]).double()
            aa, ab, bb = aa + float((a * a).sum()), ab + float((a * b).sum()), bb + float((b * b).sum())
        fitted = ab / bb  # least squares d of ema_n - w_n = d (ema_{n-1} - w_n)
        assert fitted == pytest.approx(decay, abs=2e-3), f'update {n}: EMA decay {fitted:.4f}, expected {decay:.4f}'
        residual = max(aa - 2 * fitted * ab + fitted ** 2 * bb, 0.) ** 0.5
        assert residual < 1e-3 * aa ** 0.5  # and it is one decay for every tensor


def test_a_run_stopped_mid_warmup_and_resumed_uses_the_same_lr_at_every_update(uninterrupted, resumed):
    assert 'stopped after 2 updates' in resumed['stopped'].stdout
    assert 'epoch 0, batch 4, update 2' in resumed['resumed'].stdout
    rows, reference = train_rows(resumed['out']), train_rows(uninterrupted['out'])
    assert [r['update'] for r in rows] == [r['update'] for r in reference]
    assert [r['lr'] for r in rows] == [r['lr'] for r in reference]  # bit for bit
    assert [r['lr'] for r in rows] == pytest.approx([expected_lr(r['update'] - 1) for r in rows], rel=1e-9, abs=0)


# ------------------------------------------------------------------------------------------------------------
# Mixup and label smoothing, from the targets, logits and loss of every batch of the runs.
# ------------------------------------------------------------------------------------------------------------

def test_mixup_probability_and_label_smoothing_reach_the_targets(uninterrupted):
    dump = uninterrupted['dump']
    indices = [i for e in range(EPOCHS) for i in dump['samples'][str(e)]]
    labels = [i // PER_CLASS for i in indices]  # ImageFolder: sorted classes, 7 images each
    batches = [torch.tensor(b['targets'], dtype=torch.float64) for b in dump['batches']]
    assert len(batches) == EPOCHS * IMAGES // BATCH and all(t.shape == (BATCH, CLASSES) for t in batches)
    # The loss of every batch is the cross-entropy of its logits with these targets (SoftTargetCrossEntropy).
    assert [b['loss'] for b in dump['batches']] == pytest.approx(
        [soft_cross_entropy(b['logits'], b['targets']) for b in dump['batches']], rel=1e-5)
    off = SMOOTHING / CLASSES
    on = 1 - SMOOTHING + off
    unmixed = 0
    for b, targets in enumerate(batches):
        y = torch.tensor(labels[b * BATCH:(b + 1) * BATCH])
        assert torch.allclose(targets.sum(1), torch.ones(BATCH, dtype=torch.float64), atol=1e-6)
        if torch.allclose(targets, smoothed_one_hot(y), atol=1e-6):
            unmixed += 1
            continue
        # Mixed ('batch' mode): row i is lam x its own target + (1 - lam) x that of row B - 1 - i, one lam.
        lams = [float((targets[i, y[i]] - off) / (on - off)) for i in range(BATCH) if y[i] != y[BATCH - 1 - i]]
        assert max(lams) - min(lams) < 1e-5 and 0 < min(lams) <= max(lams) < 1, (b, targets)
        assert float(targets.min()) >= off - 1e-6
    # --mixup-prob 0.5 over 21 batches: some of each (a run that mixes every batch shows at most a few
    # that look unmixed: those whose pairs happen to share a label).
    assert 4 <= unmixed <= len(batches) - 4, f'{unmixed} of {len(batches)} batches unmixed'


def test_without_mixup_the_loss_is_cross_entropy_with_smoothed_labels(two_processes):
    for rank in two_processes['dumps']:
        labels = [i // PER_CLASS for e in ('0', '1') for i in rank['samples'][e]]
        batches = rank['batches']
        assert len(batches) == len(labels) // 2  # batch 2
        for b, batch in enumerate(batches):
            assert batch['targets'] == labels[2 * b:2 * b + 2]  # the labels themselves, unmixed
        # (1 - s) x NLL + s x mean(-log p), i.e. the cross-entropy with (1 - s) one-hot + s / C.
        expected = [soft_cross_entropy(batch['logits'], smoothed_one_hot(batch['targets'])) for batch in batches]
        assert [batch['loss'] for batch in batches] == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------------------------
# The data keys: sample order by (seed, epoch), augmentation by (seed, epoch, index).
# ------------------------------------------------------------------------------------------------------------

def keyed_dataset(script, args, get_sample=None, length=None):
    """The script's training data as its train() builds it: build_transforms of the model, TransformedDataset."""
    model = timm.create_model(MODEL, num_classes=CLASSES, img_size=args.img_size)  # for its data config only
    _, transform, _ = script.build_transforms(args, model)
    if get_sample is None:
        (get_sample, length), _, _ = script.load_image_folder(args)
    return script.TransformedDataset(get_sample, length, transform, args.seed)


@pytest.mark.parametrize('flags', [[], ['--aa', 'none', '--reprob', 0, '--color-jitter', 0]],
                         ids=['deit-recipe', 'crop-and-flip-only'])
def test_augmentation_differs_between_samples_and_repeats_for_the_same_key(script, data, flags):
    args = script.parse_args([str(a) for a in recipe(data, data / 'unused', *flags)])
    image = Image.open(next((data / 'train' / 'red_circle').iterdir())).convert('RGB')
    dataset = keyed_dataset(script, args, lambda i: (image.copy(), 0), 8)  # 8 copies of one image

    def augmented(epoch, index):
        return dataset[(epoch, index)]['image']

    epoch0 = [augmented(0, i) for i in range(8)]
    # Different indices, different crops/flips (and policies): no two of the 8 alike.
    assert len({t.numpy().tobytes() for t in epoch0}) == 8
    # The key alone decides: the process RNGs seeded otherwise, the same tensors; and they are not moved.
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    rng_state = torch.get_rng_state()
    assert all(torch.equal(augmented(0, i), epoch0[i]) for i in range(8))
    assert torch.equal(torch.get_rng_state(), rng_state)
    # Another epoch, another seed: other augmentations for every index.
    assert not any(torch.equal(augmented(1, i), epoch0[i]) for i in range(8))
    args.seed += 1
    other_seed = keyed_dataset(script, args, lambda i: (image.copy(), 0), 8)
    assert not any(torch.equal(other_seed[(0, i)]['image'], epoch0[i]) for i in range(8))


def test_sample_order_is_a_permutation_keyed_by_seed_and_epoch(script):
    def order(seed, epoch):
        sampler = script.EpochShuffleSampler(IMAGES, seed)
        sampler.set_epoch(epoch)
        keys = list(sampler)
        assert [e for e, _ in keys] == [epoch] * IMAGES  # the epoch travels with each key to the dataset
        return [i for _, i in keys]

    first = order(42, 0)
    assert sorted(first) == list(range(IMAGES)) and first != sorted(first)
    assert order(42, 0) == first  # a fresh sampler, the same order
    assert order(42, 1) != first and order(42, 2) not in (first, order(42, 1))
    assert order(7, 0) != first
    # Neighbouring seeds do not replay each other's epochs shifted by one (a seed + epoch key would).
    assert order(43, 0) != order(42, 1) and order(42, 0) != order(41, 1)


def test_the_run_loads_every_sample_once_per_epoch_with_its_keyed_augmentation(script, data, uninterrupted):
    dump = uninterrupted['dump']
    args = script.parse_args([str(a) for a in recipe(data, data / 'unused')])
    dataset = keyed_dataset(script, args)
    orders = [dump['samples'][str(e)] for e in range(EPOCHS)]
    for epoch, order in enumerate(orders):
        # One process takes the sampler's (seed, epoch) permutation as it is.
        sampler = script.EpochShuffleSampler(IMAGES, args.seed)
        sampler.set_epoch(epoch)
        assert order == [i for _, i in sampler], f'epoch {epoch}: not the order of (seed, epoch)'
        # What the training process loaded is what this process computes for (seed, epoch, index).
        computed = [script.tensor_digest(dataset[(epoch, i)]['image']) for i in order]
        assert dump['images'][str(epoch)] == computed, f'epoch {epoch}: augmentations differ from their keys'
    assert len({tuple(o) for o in orders}) == EPOCHS  # reshuffled every epoch
    by_key = [dict(zip(orders[e], dump['images'][str(e)])) for e in range(EPOCHS)]
    assert all(by_key[0][i] != by_key[1][i] != by_key[2][i] for i in range(IMAGES))  # re-augmented every epoch
    assert len(set(by_key[0].values())) == IMAGES


def test_two_processes_split_each_epoch_and_augment_as_one_process(uninterrupted, two_processes):
    ranks, single = two_processes['dumps'], uninterrupted['dump']
    assert [r['num_processes'] for r in ranks] == [2, 2]
    for epoch in ('0', '1'):
        seen = [r['samples'][epoch] for r in ranks]
        assert len(seen[0]) == len(seen[1]) == IMAGES // 2
        assert sorted(seen[0] + seen[1]) == list(range(IMAGES)), f'epoch {epoch}: not every sample once: {seen}'
        # The same (seed, epoch, index) gives the same tensor whichever process loads it, at whatever batch.
        loaded = {i: h for r in ranks for i, h in zip(r['samples'][epoch], r['images'][epoch])}
        reference = dict(zip(single['samples'][epoch], single['images'][epoch]))
        assert loaded == reference, f'epoch {epoch}: augmentations differ from the one-process run'
    # The same global batch, so the same 4 updates per epoch and the same schedule (over 2 epochs).
    rows = train_rows(two_processes['out'])
    assert [r['update'] for r in rows] == list(range(1, 2 * UPDATES_PER_EPOCH + 1))
    assert [r['lr'] for r in rows] == pytest.approx([expected_lr(n - 1, epochs=2) for n in range(1, 9)],
                                                    rel=1e-9, abs=0)



def test_gradients_are_clipped_to_the_flag(uninterrupted):
    """--clip-grad: the total gradient norm of every update is at most the flag's value after clipping, and
    unchanged where it was already below (the norms are those the run's process computed, dumped by it)."""
    grads = uninterrupted['dump']['grads']
    assert [g['update'] for g in grads] == list(range(1, EPOCHS * UPDATES_PER_EPOCH + 1))
    assert any(g['norm'] > CLIP_GRAD * 1.01 for g in grads)  # the flag had something to do
    for g in grads:
        assert g['clipped'] == pytest.approx(min(g['norm'], CLIP_GRAD), rel=1e-4), g


@pytest.mark.parametrize('num_classes', [6, 4])
def test_validation_top1_top5_and_loss_by_hand(script, num_classes):
    """evaluate(): top-1 and top-5 (percent, top-5 only with more than 5 classes) and the mean unsmoothed
    cross-entropy over the whole validation set, checked on logits chosen by hand. The 'model' returns its
    input, so each batch's 'image' is its logits."""
    from accelerate import Accelerator
    logits = torch.tensor([[5., 4, 3, 2, 1, 0], [0, 9, 8, 7, 6, 5], [1, 2, 3, 4, 5, 6], [3, 3.5, 0, 0, 0, 0],
                           [0.1, 0.2, 3, 2, 0.3, 0.4]])[:, :num_classes]
    labels = torch.tensor([0, 2, 0, 0, 3])
    # By hand (no ties around a label): row 0's label ranks 1st; rows 1, 3 and 4 rank 2nd; row 2's label is
    # the smallest logit (6th of 6, 4th of 4).
    top1 = 100 * 1 / 5
    top5 = 100 * 4 / 5
    loss = float(sum(torch.logsumexp(row.double(), 0) - row[y].double() for row, y in zip(logits, labels)) / 5)
    loader = [dict(image=logits[:3], label=labels[:3]), dict(image=logits[3:], label=labels[3:])]
    results = script.evaluate(torch.nn.Identity(), loader, Accelerator(cpu=True), num_classes)
    assert results['top1'] == pytest.approx(top1) and results['samples'] == 5
    assert results['loss'] == pytest.approx(loss, rel=1e-6)
    if num_classes > 5:
        assert results['top5'] == pytest.approx(top5)
    else:
        assert 'top5' not in results
