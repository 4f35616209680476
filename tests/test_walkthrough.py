"""The researcher's round trip, run as a user runs it: fine-tune, export, load, look, evaluate, publish.

One short fine-tune with the script's default EMA settings (3 classes of generated shapes at 64 px,
from a 1000-class 224-px checkpoint), then every tool on what it wrote, each in a fresh process
through its console script, with files on disk. The oracles are independent of the loaders under
test: which weights are better comes from comparing ``results.json``'s numbers here; the expected
logits come from ``safetensors.torch.load_file`` + ``load_state_dict`` into a model built by hand.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

import spformer  # noqa: F401  (registers the models)
from test_train import CLASSES, MODEL, make_shapes, run, run_env, train_cmd

BIN = Path(sys.executable).parent  # the console scripts of this environment's install
LABELS = sorted(CLASSES[:3])


def tool(name, *args, cwd, expect_rc=0, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / name), *map(str, args)], cwd=cwd, env=env or run_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == expect_rc, f'{name} {args}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc


@pytest.fixture(scope='module')
def walk(tmp_path_factory):
    root = tmp_path_factory.mktemp('walk')
    # The checkpoint to fine-tune from, as any timm model is saved: 1000 classes, 224 px.
    torch.manual_seed(0)
    save_file(timm.create_model(MODEL).state_dict(), str(root / 'start.safetensors'))
    data = make_shapes(root / 'my_data', n_train=24, n_val=12, size=64, seed=2, classes=CLASSES[:3])
    # Default EMA settings; a short schedule and light augmentation so that it learns in a few updates.
    proc = run(train_cmd('--data-dir', data, '--model', MODEL, '--initial-checkpoint', root / 'start.safetensors',
                         '--img-size', 64, '--batch-size', 16, '--epochs', 3, '--lr', 1e-3, '--warmup-epochs', 0,
                         '--aa', 'none', '--reprob', 0, '--mixup', 0, '--cutmix', 0, '--no-plot',
                         '--output', root / 'run'))
    final = root / 'run' / 'final'
    results = json.loads((final / 'results.json').read_text())
    # The oracle for "the better-validating weights": the numbers, compared here.
    ema_better = (results['top1_ema'], -results['loss_ema']) > (results['top1'], -results['loss'])
    better = final / ('model_ema.safetensors' if ema_better else 'model.safetensors')
    work = root / 'work'
    work.mkdir()
    return dict(root=root, final=final, results=results, better=better, work=work, train=proc)


def expected_logits(file: Path, x: torch.Tensor) -> torch.Tensor:
    model = timm.create_model(MODEL, img_size=64, num_classes=3)
    model.load_state_dict(load_file(str(file)))
    with torch.inference_mode():
        return model.eval()(x)


def test_the_fine_tune_learned_and_its_ema_is_not_stuck(walk):
    results = walk['results']
    assert results['top1'] > 100 / 3 + 20 and results['top1_ema'] > 100 / 3 + 20, results  # chance is 33.3
    assert not [k for k in results if k.startswith('top5')]  # 3 classes: top-5 would be 100 % by construction
    assert results['selected_weights'] == ('ema' if walk['better'].name == 'model_ema.safetensors' else 'model')


def test_export_publishes_the_better_weights_and_says_why(walk):
    proc = tool('spformer-hub', 'export', walk['final'], 'exported', '--repo-id', 'someone/shapes-3',
                cwd=walk['work'])
    first = proc.stdout.splitlines()[0]
    assert first.startswith(f'weights : {walk["better"]}: ') and walk['results']['selection_reason'] in first
    exported = walk['work'] / 'exported'
    pushed, better = load_file(str(exported / 'model.safetensors')), load_file(str(walk['better']))
    assert pushed.keys() == better.keys() and all(torch.equal(pushed[k], better[k]) for k in better)

    # A card you can publish: no local path, no dataset or tag that is not true, no top-5 of 3 classes.
    card = (exported / 'README.md').read_text()
    config = json.loads((exported / 'config.json').read_text())
    for local in (str(walk['root']), 'my_data', 'data_dir', 'initial_checkpoint', 'output:'):
        assert local not in card, local
    assert 'tag' not in config['pretrained_cfg'] and config['num_classes'] == 3 and config['label_names'] == LABELS
    meta = yaml.safe_load(re.match(r'^---\n(.*?)\n---\n', card, re.S).group(1))
    assert 'datasets' not in meta and 'model-index' not in meta and meta['metrics'] == ['accuracy']
    assert 'top5' not in card and 'Top-5' not in card
    assert '- **Image size:** 64 x 64' in card and '- **Classes:** 3' in card
    assert walk['results']['selection_reason'][1:] in card  # which weights, and why


def test_the_card_usage_block_runs_as_written(walk, tmp_path):
    # Push the exported folder to an in-memory Hub, then run the card's code verbatim in a fresh process
    # (with the same Hub served there), next to an image.jpg, as a reader of the card would.
    from huggingface_hub import HfApi, constants
    from spformer.hub.testing import FakeHub
    exported = walk['work'] / 'exported'
    if not exported.is_dir():
        tool('spformer-hub', 'export', walk['final'], 'exported', '--repo-id', 'someone/shapes-3', cwd=walk['work'])
    usage = re.search(r'## Usage\n\n```python\n(.*?)```', (exported / 'README.md').read_text(), re.S).group(1)
    hub = FakeHub()
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        with hub.installed():
            HfApi(token='hf_fake').create_repo('someone/shapes-3')
            HfApi(token='hf_fake').upload_folder(repo_id='someone/shapes-3', folder_path=str(exported))
    finally:
        constants.HF_HUB_OFFLINE = saved
    state = hub.save(tmp_path / 'hub')
    from PIL import Image
    Image.open(next((walk['root'] / 'my_data' / 'val' / LABELS[0]).iterdir())).convert('RGB').save(tmp_path / 'image.jpg')
    (tmp_path / 'usage.py').write_text(usage)
    runner = ('import sys\nfrom spformer.hub.testing import FakeHub\nwith FakeHub.load(sys.argv[1]).installed():\n'
              "    exec(compile(open('usage.py').read(), 'usage.py', 'exec'), {'__name__': '__main__'})\n")
    proc = subprocess.run([sys.executable, '-c', runner, str(state)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=run_env(HF_HOME=tmp_path / 'hf', HF_HUB_OFFLINE='0'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and all(re.fullmatch(r'(\S+): \d+\.\d%', line) for line in lines), lines
    assert {line.split(':')[0] for line in lines} == set(LABELS)


LOAD = '''
import sys, torch, safetensors.torch
import spformer
from spformer.hub import load_checkpoint_folder
model = load_checkpoint_folder(sys.argv[1]).eval()
x = safetensors.torch.load_file(sys.argv[2])['x']
with torch.inference_mode():
    safetensors.torch.save_file({'logits': model(x).contiguous()}, sys.argv[3])
'''


def test_load_checkpoint_folder_takes_the_better_weights_in_a_fresh_process(walk, tmp_path):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    save_file({'x': x}, str(tmp_path / 'x.safetensors'))
    run([sys.executable, '-c', LOAD, walk['final'], tmp_path / 'x.safetensors', tmp_path / 'logits.safetensors'])
    logits = load_file(str(tmp_path / 'logits.safetensors'))['logits']
    assert torch.allclose(logits, expected_logits(walk['better'], x), atol=1e-5, rtol=0)


def test_demo_on_the_fine_tuned_file_and_folder(walk):
    proc = tool('spformer-demo', '--checkpoint', walk['final'] / 'model.safetensors', '--out', 'demo.png',
                cwd=walk['work'])
    out = proc.stdout
    assert f'model       : {MODEL}' in out and f'weights     : {walk["final"] / "model.safetensors"}' in out
    assert '-> (1, 3, 64, 64)' in out and 'output      : (1, 3)' in out and 'UNTRAINED' not in out
    assert 'top-3       :' in out and sum(name in out for name in LABELS) == 3
    assert (walk['work'] / 'demo.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    out = tool('spformer-demo', '--checkpoint', walk['final'], '--out', 'demo_folder.png', cwd=walk['work']).stdout
    assert f'weights     : {walk["better"]} ({walk["results"]["selection_reason"]})' in out

    # A --model that is not the checkpoint's: one line naming the argument and what to pass.
    proc = tool('spformer-demo', '--model', 'spformer_small_sp16_224', '--checkpoint', walk['final'] / 'model.safetensors',
                cwd=walk['work'], expect_rc=1)
    assert proc.stderr.count('\n') == 1 and '--checkpoint' in proc.stderr and f'holds {MODEL} weights' in proc.stderr


def test_eval_and_visualize_on_the_fine_tuned_model(walk):
    work = walk['work']
    subprocess.run([sys.executable, '-c', "from spformer.eval.datasets import write_shapes_dataset; "
                    "write_shapes_dataset('eval_data', 'folder', num_images=2, size=(96, 128), seed=0)"],
                   cwd=work, check=True, env=run_env())
    spec = f'{MODEL}={walk["final"] / "model.safetensors"}'
    out = tool('spformer-eval-superpixels', 'eval_data', '--model', spec, '--pictures', '1', '--out-dir', 'eval',
               '--no-progress', cwd=work).stdout
    assert 'every image resized to 64x64' in out and 'with 16 segments' in out  # 4x4 tokens at 64 px
    assert f'| {spec} | ' in out and 'UNTRAINED' not in out
    image = next((work / 'eval_data' / 'images').iterdir())
    out = tool('spformer-visualize', image, '--model', walk['final'], '--out', 'vis.png', cwd=work).stdout
    assert f'{walk["better"]}' in out and 'resized to 64x64' in out
    assert (work / 'vis.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_timm_alone_loads_the_file_with_its_classes_and_input_size(walk):
    file = walk['final'] / 'model.safetensors'
    model = timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=str(file))).eval()
    assert model.num_classes == 3 and model.img_size == (64, 64)
    assert model.pretrained_cfg['label_names'] == LABELS
    config = timm.data.resolve_model_data_config(model)
    assert config['input_size'] == (3, 64, 64)
    transform = timm.data.create_transform(**config, is_training=False)
    from PIL import Image
    x = transform(Image.new('RGB', (100, 80), (120, 30, 200)))[None]
    assert torch.allclose(model(x), expected_logits(file, x), atol=1e-5, rtol=0)
