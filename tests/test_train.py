"""train_imagenet.py on CPU: learning, exact resume, crash safety, two processes, datasets, export, errors."""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from conftest import script_env

CLASSES = ('red_circle', 'green_square', 'blue_triangle', 'yellow_bar')


def make_shapes(root, n_train: int = 32, n_val: int = 12, size: int = 64, seed: int = 0, classes=CLASSES) -> Path:
    """An ImageFolder (train/, val/) of `classes` (COLOUR_SHAPE, by default the 4 of CLASSES), one coloured shape
    each, at random places and sizes on a noisy background; colour and shape both tell the class, so a tiny
    model learns it in a few dozen steps."""
    rng = np.random.default_rng(seed)
    colours = {'red': (220, 40, 40), 'green': (40, 200, 60), 'blue': (40, 70, 230), 'yellow': (230, 210, 40),
               'purple': (150, 50, 200), 'cyan': (40, 210, 210)}
    root = Path(root)
    for split, n in (('train', n_train), ('val', n_val)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            colour, shape = name.split('_')
            for i in range(n):
                background = rng.integers(60, 140, size=(size, size, 3), dtype=np.uint8)
                image = Image.fromarray(background)
                draw = ImageDraw.Draw(image)
                r = rng.uniform(0.22, 0.4) * size
                cx, cy = rng.uniform(r, size - r, size=2)
                fill = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in colours[colour])
                if shape == 'circle':
                    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
                elif shape == 'square':
                    draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
                elif shape == 'triangle':
                    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
                else:
                    draw.rectangle([cx - r, cy - r / 3, cx + r, cy + r / 3], fill=fill)
                image.save(folder / f'{i:03d}.png')
    return root


# ------------------------------------------------------------------------------------------------------------
# Helpers: every training run is a fresh process, as a user would start it.
# ------------------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'train_imagenet.py'
MODEL = 'spformer_tiny_sp16_224'


def run_env(**extra) -> dict:
    return script_env(**{'TRITON_INTERPRET': '1', **extra})


def run(cmd, env=None, timeout=240, expect_rc=0) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env or run_env(), capture_output=True, text=True,
                          timeout=timeout)
    if expect_rc is not None and proc.returncode != expect_rc:
        raise AssertionError(f'{" ".join(map(str, cmd))}\nexited {proc.returncode} (expected {expect_rc})\n'
                             f'--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}')
    return proc


def train_cmd(*args) -> list:
    return [sys.executable, SCRIPT, *args]


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def same_safetensors(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def shapes64(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp('shapes64'), n_train=32, n_val=12, size=64)


@pytest.fixture(scope='module')
def shapes32(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp('shapes32'), n_train=12, n_val=4, size=32)


# ------------------------------------------------------------------------------------------------------------
# One learning run (64 px, light augmentation), shared by the tests below it. It is started through a
# wrapper that replaces spformer.hub.push_to_hub by a recorder, so --push-to-hub is exercised without a Hub.
# ------------------------------------------------------------------------------------------------------------

PUSH_WRAPPER = '''
import json, runpy, sys
import spformer.hub
log = sys.argv[1]
def fake_push_to_hub(folder, repo_id, **kwargs):
    with open(log, 'w') as f:
        json.dump(dict(folder=str(folder), repo_id=repo_id, **kwargs), f)
    return 'https://huggingface.co/fake/commit'
spformer.hub.push_to_hub = fake_push_to_hub
script, sys.argv = sys.argv[2], sys.argv[2:]
runpy.run_path(script, run_name='__main__')
'''


@pytest.fixture(scope='module')
def learned(tmp_path_factory, shapes64):
    out = tmp_path_factory.mktemp('learned')
    dump, push_log = out / 'dump', out / 'push.json'
    proc = run([sys.executable, '-c', PUSH_WRAPPER, push_log, SCRIPT,
                '--data-dir', shapes64, '--model', MODEL, '--img-size', 64, '--batch-size', 16, '--epochs', 3,
                '--lr', 1e-3, '--warmup-epochs', 1, '--aa', 'none', '--reprob', 0, '--mixup', 0, '--cutmix', 0,
                '--model-ema-decay', 0.9, '--workers', 1, '--log-interval', 1, '--checkpoint-every', 5,
                '--keep-checkpoints', 2, '--output', out / 'run', '--push-to-hub', 'someone/spformer-shapes'],
               env=run_env(SPFORMER_TRAIN_TEST_DUMP=dump))
    return dict(out=out / 'run', dump=dump, push_log=push_log, proc=proc)


def test_loss_drops_and_validation_beats_chance(learned):
    rows = read_jsonl(learned['out'] / 'metrics.jsonl')
    losses = [r['loss'] for r in rows if r['kind'] == 'train']
    assert len(losses) == 24  # 3 epochs x 8 updates, one row each (--log-interval 1)
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert last < 0.6 * first, f'loss did not drop clearly: first four {losses[:4]}, last four {losses[-4:]}'
    val = [r for r in rows if r['kind'] == 'val']
    assert [r['epoch'] for r in val] == [1, 2, 3] and all(r['samples'] == 48 for r in val)
    results = json.loads((learned['out'] / 'final' / 'results.json').read_text())
    chance = 100. / len(CLASSES)
    assert results['top1'] >= chance + 35, results  # 48 held-out images; chance is 25 %
    assert results['top1_ema'] >= chance + 35, results
    assert 'val top-1' in learned['proc'].stdout + learned['proc'].stderr


def test_outputs_config_checkpoints_curves_and_push(learned):
    out = learned['out']
    final = out / 'final'
    assert sorted(p.name for p in final.iterdir()) == [
        'config.json', 'model.safetensors', 'model_ema.safetensors', 'results.json', 'train_config.yaml']
    config = json.loads((final / 'config.json').read_text())
    assert config['architecture'] == MODEL and config['num_classes'] == 4
    assert config['label_names'] == sorted(CLASSES)
    assert config['model_args']['img_size'] == [64, 64] and 'attn_backend' not in config['model_args']
    effective = yaml.safe_load((out / 'train_config.yaml').read_text())
    assert effective['batch_size'] == 16 and effective['lr'] == 1e-3 and effective['mixup'] == 0
    assert effective['model_ema_decay'] == 0.9 and effective['opt'] == 'adamw' and effective['epochs'] == 3
    assert (final / 'train_config.yaml').read_text() == (out / 'train_config.yaml').read_text()
    # Checkpoints every 5 updates and at each epoch end (8, 16, 24), the last two kept.
    assert sorted(p.name for p in (out / 'checkpoints').iterdir()) == ['step_00000020', 'step_00000024']
    assert (out / 'checkpoints' / 'step_00000024' / 'train_config.yaml').is_file()
    pytest.importorskip('matplotlib', reason='matplotlib (a dev extra) draws training_curves.png')
    assert (out / 'training_curves.png').stat().st_size > 10_000
    push = json.loads(learned['push_log'].read_text())
    assert push == dict(folder=str(final), repo_id='someone/spformer-shapes', private=False)


LOAD_CHECK = '''
import sys, torch, timm
import spformer  # registers the models
final, ref = sys.argv[1], torch.load(sys.argv[2], weights_only=True)
for weights, key in (('model.safetensors', 'model'), ('model_ema.safetensors', 'model_ema')):
    model = timm.create_model('spformer_tiny_sp16_224', pretrained=True, num_classes=4, img_size=64,
                              pretrained_cfg_overlay=dict(file=f'{final}/{weights}', num_classes=4)).eval()
    with torch.no_grad():
        assert torch.equal(model(ref['input']), ref[key]), key
model = timm.create_model(f'local-dir:{final}', pretrained=True).eval()  # config.json rebuilds it alone
with torch.no_grad():
    assert torch.equal(model(ref['input']), ref['model'])
assert model.pretrained_cfg['label_names'] == ['blue_triangle', 'green_square', 'red_circle', 'yellow_bar']
print('same logits')
'''


def test_final_folder_loads_in_a_fresh_process_with_the_same_logits(learned):
    proc = run([sys.executable, '-c', LOAD_CHECK, learned['out'] / 'final', learned['dump'] / 'final_logits.pt'])
    assert 'same logits' in proc.stdout


# ------------------------------------------------------------------------------------------------------------
# A short fine-tune of the learned weights (--initial-checkpoint) on 3 classes of new images, with the
# default EMA settings (decay 0.99996, warm-up) and the default --workers; shared by the tests below it.
# ------------------------------------------------------------------------------------------------------------

BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked')  # copied, not averaged, by ModelEmaV3


@pytest.fixture(scope='module')
def fine_tuned(tmp_path_factory, learned):
    root = tmp_path_factory.mktemp('fine_tuned')
    data = make_shapes(root / 'shapes3', n_train=32, n_val=12, size=64, seed=1, classes=CLASSES[:3])
    start = learned['out'] / 'final' / 'model.safetensors'
    proc = run(train_cmd('--data-dir', data, '--model', MODEL, '--img-size', 64, '--batch-size', 16, '--epochs', 2,
                         '--lr', 2e-4, '--warmup-epochs', 0, '--aa', 'none', '--reprob', 0, '--mixup', 0, '--cutmix', 0,
                         '--initial-checkpoint', start, '--log-interval', 1, '--output', root / 'run'))
    return dict(out=root / 'run', start=start, proc=proc)


def distance(a: dict, b: dict, keys) -> float:
    return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in keys).sqrt())


def test_initial_checkpoint_starts_the_fine_tune_from_its_weights(fine_tuned):
    final = fine_tuned['out'] / 'final'
    config = json.loads((final / 'config.json').read_text())
    assert config['num_classes'] == 3 and config['label_names'] == sorted(CLASSES[:3])
    start, weights = load_file(str(fine_tuned['start'])), load_file(str(final / 'model.safetensors'))
    assert start['head.weight'].shape[0] == 4 and weights['head.weight'].shape[0] == 3  # a new classifier
    body = [k for k in start if not k.startswith('head.') and not k.endswith(BUFFERS)]
    assert body and all(weights[k].shape == start[k].shape for k in body)
    # 12 updates at lr 2e-4 move the loaded body by ~2 % of its norm; a random init is ~70 % away from it.
    size = float(sum((start[k].double() ** 2).sum() for k in body).sqrt())
    moved = distance(weights, start, body) / size
    assert moved < 0.1, f'the fine-tuned body is {moved:.0%} away from --initial-checkpoint: was it loaded?'
    results = json.loads((final / 'results.json').read_text())
    assert results['top1'] >= 100. / 3 + 30, results  # 36 held-out images of 3 classes


def test_ema_warms_up_and_results_name_the_better_weights(fine_tuned):
    final = fine_tuned['out'] / 'final'
    assert {'model.safetensors', 'model_ema.safetensors'} <= {p.name for p in final.iterdir()}
    effective = yaml.safe_load((fine_tuned['out'] / 'train_config.yaml').read_text())
    assert effective['model_ema'] is True and effective['model_ema_warmup'] is True
    assert effective['model_ema_decay'] == 0.99996
    # The EMA followed the weights. Without the warm-up (--no-model-ema-warmup) it is the weights after the
    # first update (ModelEmaV3 copies them there) plus 0.99996-decayed crumbs: ~25 % of the way, not ~90 %.
    start = load_file(str(fine_tuned['start']))
    weights, ema = load_file(str(final / 'model.safetensors')), load_file(str(final / 'model_ema.safetensors'))
    body = [k for k in start if not k.startswith('head.') and not k.endswith(BUFFERS)]
    followed = distance(ema, start, body) / distance(weights, start, body)
    assert followed > 0.6, f'the EMA moved only {followed:.0%} as far as the weights from their start'
    results = json.loads((final / 'results.json').read_text())
    assert results['top1_ema'] >= results['top1'] - 10, results
    # The better-validating file is named: higher top-1, on a tie lower loss, on a full tie the weights.
    ema_better = (results['top1_ema'], -results['loss_ema']) > (results['top1'], -results['loss'])
    assert results['selected_weights'] == ('ema' if ema_better else 'model'), results
    reason = results['selection_reason']
    assert isinstance(reason, str) and len(reason) > 20 and '\n' not in reason
    chosen = final / ('model_ema.safetensors' if ema_better else 'model.safetensors')
    assert f'final weights to use: {chosen} ' in fine_tuned['proc'].stdout and reason in fine_tuned['proc'].stdout


def test_top5_is_reported_only_with_more_than_five_classes(fine_tuned, tmp_path):
    # 3 classes: top-5 would be 100 % by construction, so it is nowhere.
    out, proc = fine_tuned['out'], fine_tuned['proc']
    results = json.loads((out / 'final' / 'results.json').read_text())
    val = [r for r in read_jsonl(out / 'metrics.jsonl') if r['kind'] == 'val']
    assert len(val) == 2 and all('top1' in r and 'top1_ema' in r for r in val)
    assert not [k for r in [results, *val] for k in r if k.startswith('top5')]
    epoch_lines = [line for line in proc.stdout.splitlines() if line.startswith('epoch ')]
    assert len(epoch_lines) == 2 and not [line for line in epoch_lines if 'top-5' in line], epoch_lines
    # 6 classes: top-5 of the weights and of the EMA everywhere. The run also picks --attn-backend cpu.
    classes = (*CLASSES, 'purple_circle', 'cyan_square')
    data = make_shapes(tmp_path / 'shapes6', n_train=4, n_val=2, size=32, classes=classes)
    proc = run(train_cmd('--data-dir', data, '--model', MODEL, '--img-size', 32, '--batch-size', 8, '--epochs', 1,
                         '--warmup-epochs', 0, '--attn-backend', 'cpu', '--workers', 0, '--no-plot',
                         '--output', tmp_path / 'run'))
    results = json.loads((tmp_path / 'run' / 'final' / 'results.json').read_text())
    [val] = [r for r in read_jsonl(tmp_path / 'run' / 'metrics.jsonl') if r['kind'] == 'val']
    for row in (results, val):
        assert 0 <= row['top1'] <= row['top5'] <= 100 and 0 <= row['top1_ema'] <= row['top5_ema'] <= 100, row
    assert re.search(r'^epoch 1/1: val top-1 \S+  top-5 \S+  \(EMA top-1 \S+  top-5 \S+\)$', proc.stdout, re.M), \
        proc.stdout
    assert yaml.safe_load((tmp_path / 'run' / 'train_config.yaml').read_text())['attn_backend'] == 'cpu'


def test_workers_default_to_the_cpus_available(fine_tuned, learned):
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    effective = yaml.safe_load((fine_tuned['out'] / 'train_config.yaml').read_text())
    assert effective['workers'] == min(8, cpus)
    assert 'worker processes in total' not in fine_tuned['proc'].stderr  # torch's warning about too many
    assert yaml.safe_load((learned['out'] / 'train_config.yaml').read_text())['workers'] == 1  # as given


# ------------------------------------------------------------------------------------------------------------
# Exact resumption: the full DeiT recipe (RandAugment, random erasing, Mixup/CutMix, drop path, EMA) with
# gradient accumulation, 32 px; 2 epochs of 3 updates. Interrupted runs must end bit-identical to this one.
# ------------------------------------------------------------------------------------------------------------

def recipe_args(data: Path, output: Path, *extra) -> list:
    return ['--data-dir', data, '--model', MODEL, '--img-size', 32, '--batch-size', 8, '--grad-accum-steps', 2,
            '--epochs', 2, '--lr', 1e-3, '--warmup-epochs', 1, '--model-ema-decay', 0.9, '--checkpoint-every', 2,
            '--log-interval', 1, '--no-plot', '--output', output, *extra]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, shapes32) -> Path:
    out = tmp_path_factory.mktemp('uninterrupted') / 'run'
    run(train_cmd(*recipe_args(shapes32, out, '--workers', 0)))
    return out


def assert_same_final(a: Path, b: Path):
    for name in ('model.safetensors', 'model_ema.safetensors'):
        assert same_safetensors(a / 'final' / name, b / 'final' / name), f'{name} differs from the uninterrupted run'
    rows_a, rows_b = read_jsonl(a / 'metrics.jsonl'), read_jsonl(b / 'metrics.jsonl')
    assert [(r['kind'], r['update']) for r in rows_a] == [(r['kind'], r['update']) for r in rows_b]
    assert [r.get('loss') for r in rows_a] == [r.get('loss') for r in rows_b]


@pytest.fixture(scope='module')
def interrupted(tmp_path_factory, shapes32) -> dict:
    """One run interrupted twice: SIGKILLed while writing the epoch-end checkpoint of update 3, resumed (with
    two loader workers: the augmentation of a sample does not depend on who loads it) and stopped after
    update 4 (mid-epoch 2), then resumed to the end."""
    out = tmp_path_factory.mktemp('interrupted') / 'run'
    ckpts = out / 'checkpoints'
    steps = {}
    steps['killed'] = run(train_cmd(*recipe_args(shapes32, out, '--workers', 0)),
                          env=run_env(SPFORMER_TRAIN_TEST_KILL_AT=3), expect_rc=-signal.SIGKILL)
    steps['after_kill'] = sorted(p.name for p in ckpts.iterdir())
    steps['tmp_had_weights'] = (ckpts / '.tmp-step_00000003' / 'model.safetensors').is_file()
    steps['stopped'] = run(train_cmd(*recipe_args(shapes32, out, '--workers', 2, '--resume', 'latest',
                                                  '--stop-after-steps', 4)))
    steps['after_stop'] = sorted(p.name for p in ckpts.iterdir())
    steps['final_after_stop'] = (out / 'final').exists()
    steps['resumed'] = run(train_cmd(*recipe_args(shapes32, out, '--workers', 0, '--resume', 'latest')))
    return dict(out=out, **steps)


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_last_complete_one(interrupted, uninterrupted):
    # The kill left the state files of update 3 in a temporary folder; 'latest' is the complete update 2.
    assert interrupted['after_kill'] == ['.tmp-step_00000003', 'step_00000002']
    assert interrupted['tmp_had_weights']
    assert 'step_00000002: epoch 0, batch 4, update 2' in interrupted['stopped'].stdout
    assert '.tmp-step_00000003' not in interrupted['after_stop']  # removed by the next save
    assert_same_final(uninterrupted, interrupted['out'])


def test_stop_then_resume_equals_one_uninterrupted_run(interrupted, uninterrupted):
    stopped = interrupted['stopped']
    assert 'stopped after 4 updates' in stopped.stdout + stopped.stderr
    assert not interrupted['final_after_stop']
    assert interrupted['after_stop'] == ['step_00000002', 'step_00000003', 'step_00000004']
    assert 'step_00000004: epoch 1, batch 2, update 4' in interrupted['resumed'].stdout  # 2 of 6 batches done
    assert_same_final(uninterrupted, interrupted['out'])  # model and EMA bit-identical, same metric rows


# ------------------------------------------------------------------------------------------------------------
# Two processes (torchrun + gloo on CPU), Hugging Face datasets, bad input.
# ------------------------------------------------------------------------------------------------------------

def test_two_processes_see_disjoint_shards_and_end_with_identical_weights(tmp_path, shapes32):
    dump = tmp_path / 'dump'
    run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', 2, '--master_addr', '127.0.0.1',
         '--master_port', free_port(), SCRIPT, '--data-dir', shapes32, '--model', MODEL, '--img-size', 32,
         '--batch-size', 4, '--epochs', 2, '--warmup-epochs', 0, '--model-ema-decay', 0.9, '--workers', 0,
         '--no-plot', '--output', tmp_path / 'run'],
        env=run_env(ACCELERATE_USE_CPU=1, SPFORMER_TRAIN_TEST_DUMP=dump))
    ranks = [json.loads((dump / f'rank{i}.json').read_text()) for i in range(2)]
    assert [r['num_processes'] for r in ranks] == [2, 2]
    orders = []
    for epoch in ('0', '1'):
        seen = [r['samples'][epoch] for r in ranks]
        assert len(seen[0]) == len(seen[1]) == 24
        assert not set(seen[0]) & set(seen[1]), f'epoch {epoch}: both processes saw {set(seen[0]) & set(seen[1])}'
        assert sorted(seen[0] + seen[1]) == list(range(48))  # 48 = 6 global batches of 2 x 4: nothing dropped
        orders.append(seen[0])
    assert orders[0] != orders[1]  # reshuffled every epoch
    assert ranks[0]['weights_sha256'] == ranks[1]['weights_sha256']
    assert ranks[0]['ema_sha256'] == ranks[1]['ema_sha256']
    assert (tmp_path / 'run' / 'final' / 'model.safetensors').is_file()


@pytest.mark.parametrize('streaming', [False, True], ids=['map-style', 'streaming'])
def test_hugging_face_datasets_imagefolder(tmp_path, shapes32, streaming):
    out = tmp_path / 'run'
    run(train_cmd('--hf-dataset', shapes32, '--model', MODEL, '--img-size', 32, '--batch-size', 8, '--epochs', 1,
                  '--warmup-epochs', 0, '--workers', 0, '--log-interval', 1, '--no-plot', '--output', out,
                  # the streamed run also trains in bf16 (CPU autocast): one launch checks both
                  *(['--streaming', '--train-samples', 48, '--mixed-precision', 'bf16'] if streaming else [])),
        env=run_env(HF_HOME=tmp_path / 'hf_home', HF_DATASETS_OFFLINE=1))
    rows = read_jsonl(out / 'metrics.jsonl')
    assert [r['update'] for r in rows if r['kind'] == 'train'] == [1, 2, 3, 4, 5, 6]  # 48 images / 8
    assert [r['samples'] for r in rows if r['kind'] == 'val'] == [16]
    config = json.loads((out / 'final' / 'config.json').read_text())
    assert config['label_names'] == sorted(CLASSES)  # from the ClassLabel feature
    effective = yaml.safe_load((out / 'train_config.yaml').read_text())
    assert effective['val_split'] == 'validation' and effective['streaming'] is streaming
    assert ('mixed precision bf16' in (out / 'train_config.yaml').read_text()) is streaming




def errors_of(script, capsys, *args) -> str:
    assert script.main([str(a) for a in args]) == 2
    return capsys.readouterr().err


def test_bad_input_names_the_argument_what_it_got_and_what_it_expects(script, capsys, tmp_path, shapes32):
    base = ['--model', MODEL, '--batch-size', 8, '--output', tmp_path / 'out']
    err = errors_of(script, capsys, '--data-dir', tmp_path / 'missing', *base)
    assert '--data-dir' in err and 'missing' in err and 'train/' in err
    (tmp_path / 'empty').mkdir()
    err = errors_of(script, capsys, '--data-dir', tmp_path / 'empty', *base)
    assert '--data-dir/--train-split' in err and 'empty/train' in err
    (tmp_path / 'no_images' / 'train' / 'cat').mkdir(parents=True)
    err = errors_of(script, capsys, '--data-dir', tmp_path / 'no_images', *base)
    assert 'hold no images' in err
    shutil.copytree(shapes32, tmp_path / 'differ')
    shutil.move(tmp_path / 'differ' / 'val' / 'red_circle', tmp_path / 'differ' / 'val' / 'red_disc')
    err = errors_of(script, capsys, '--data-dir', tmp_path / 'differ', *base)
    assert "only in train/: ['red_circle']" in err and "only in val/: ['red_disc']" in err
    err = errors_of(script, capsys, '--data-dir', shapes32, *base, '--batch-size', 7)
    assert '--batch-size: got 7' in err and 'even' in err and '--mixup 0 --cutmix 0' in err
    err = errors_of(script, capsys, '--data-dir', shapes32, *base, '--model', 'spformer_huge')
    assert "--model: 'spformer_huge'" in err and 'spformer_small_sp16_224' in err
    err = errors_of(script, capsys, *base)
    assert '--data-dir / --hf-dataset' in err and 'exactly one' in err
    err = errors_of(script, capsys, '--data-dir', shapes32, *base, '--pretrained', '--initial-checkpoint', 'x')
    assert '--pretrained / --initial-checkpoint' in err
    err = errors_of(script, capsys, '--data-dir', shapes32, *base, '--resume', tmp_path / 'nowhere')
    assert '--resume' in err and 'nowhere' in err and 'checkpoints/step_N' in err
    err = errors_of(script, capsys, '--hf-dataset', shapes32, *base, '--data-dir', shapes32)
    assert 'exactly one' in err
    (tmp_path / 'taken' / 'checkpoints' / 'step_00000001').mkdir(parents=True)
    err = errors_of(script, capsys, '--data-dir', shapes32, *base, '--output', tmp_path / 'taken')
    assert '--output' in err and '--resume latest' in err


def test_yaml_config_sets_defaults_and_flags_override_it(script, tmp_path):
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text('model: spformer_tiny_sp16_224\nbatch-size: 32\nlr: 0.002\nmixup: 0.0\nepochs: 7\n')
    args = script.parse_args(['--config', str(cfg), '--data-dir', 'x', '--batch-size', '16'])
    assert (args.model, args.batch_size, args.lr, args.mixup, args.epochs) == (MODEL, 16, 0.002, 0.0, 7)
    assert args.weight_decay == 0.05 and args.cutmix == 1.0 and args.aa == 'rand-m9-mstd0.5-inc1'  # DeiT defaults
    cfg.write_text('batch_sise: 32\n')
    with pytest.raises(script.ConfigError, match=r"--config: .* unknown options \['batch_sise'\]"):
        script.parse_args(['--config', str(cfg), '--data-dir', 'x'])
    example = script.parse_args(['--config', str(ROOT / 'configs' / 'deit_in1k.yaml'), '--data-dir', 'x'])
    assert example.epochs == 300 and example.model_ema and example.smoothing == 0.1


def test_help_lists_every_option_with_help_and_default(script):
    proc = run(train_cmd('--help'), env=run_env(COLUMNS=100))
    # One entry per option: its line '  --flag ...' and the more deeply indented lines after it.
    entries, current = [], None
    for line in proc.stdout.splitlines():
        if line.startswith('  -'):
            current = [line]
            entries.append(current)
        elif current is not None and line.startswith('   '):
            current.append(line)
        else:  # a group title or a blank line
            current = None
    entries = [' '.join(' '.join(e).split()) for e in entries]
    actions = [a for a in script.build_parser()._actions if a.default is not argparse.SUPPRESS]
    assert len(actions) > 60
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    for action in actions:
        flag = action.option_strings[0]
        found = [e for e in entries if e.startswith((flag + ' ', flag + ','))]
        assert len(found) == 1, f'{flag} is not listed once in --help'
        entry = found[0]
        assert action.help and ' '.join(action.help.split()[:3]) in entry, f'{flag} has no help text: {entry!r}'
        assert f'(default: {action.default})' in entry, f'{flag} does not show its default: {entry!r}'
        if action.choices:
            assert '{' + ','.join(map(str, action.choices)) + '}' in entry, f'{flag} does not show its choices'
    assert '{auto,torch,cpu,triton,reference}' in proc.stdout
    [workers] = [e for e in entries if e.startswith('--workers')]
    assert workers.endswith(f'min(8, CPUs available) unless set (default: {min(8, cpus)})'), workers


def test_attn_backend_choices_are_the_kernel_backends(script, capsys):
    # A training run with --attn-backend cpu: test_top5_is_reported_only_with_more_than_five_classes.
    from spformer.kernels.functional import BACKENDS
    [action] = [a for a in script.build_parser()._actions if a.dest == 'attn_backend']
    assert tuple(action.choices) == BACKENDS and 'cpu' in BACKENDS
    for backend in BACKENDS:
        assert script.parse_args(['--data-dir', 'x', '--attn-backend', backend]).attn_backend == backend
    with pytest.raises(SystemExit):
        script.parse_args(['--data-dir', 'x', '--attn-backend', 'fused'])
    assert "argument --attn-backend: invalid choice: 'fused'" in capsys.readouterr().err


def test_pretrained_without_published_weights_is_a_one_line_error(tmp_path, shapes32):
    proc = run(train_cmd('--data-dir', shapes32, '--model', MODEL, '--pretrained', '--img-size', 32,
                         '--output', tmp_path / 'run'),
               env=run_env(HF_HOME=tmp_path / 'hf_home'), expect_rc=2)
    assert 'Traceback' not in proc.stderr, proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if line.strip()]
    assert line.startswith(f'train_imagenet.py: error: --pretrained: no weights are published for --model {MODEL}; ')
    assert '--initial-checkpoint FILE.safetensors' in line and '--model hf-hub:ORG/NAME --pretrained' in line
    assert 'create_model' not in line and 'pretrained=True' not in line  # flags, not Python calls
    assert not (tmp_path / 'run' / 'checkpoints').exists()
