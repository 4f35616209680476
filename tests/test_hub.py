"""spformer.hub: publishing to the Hugging Face Hub and loading back the timm way.

The Hub is never reached: pushes go through the real ``huggingface_hub`` client to
``spformer.hub.testing.FakeHub`` (an ``httpx2.MockTransport`` behind ``set_client_factory``), and the
loads are timm's own (``hf-hub:`` ids, registered tags with ``hf_hub_id``, ``pretrained_cfg_overlay``).
Oracles are independent of the code under test: timm's ``save_for_hf`` writes the training folders
(the layout train_imagenet.py exports), ``safetensors`` reads what was pushed, logits come from the
in-memory model that was trained, and ``yaml.safe_load`` parses the card.
"""
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import textwrap
import uuid

import pytest
import safetensors.torch
from safetensors.torch import load as load_safetensors_bytes  # bytes -> tensors; safetensors, never pickle
import torch
import torch.nn.functional as F
import timm
import yaml
from huggingface_hub import HfApi, constants
from timm.models import save_for_hf
from timm.utils.model_ema import ModelEmaV3

import spformer  # noqa: F401  (registers the models)
from spformer.hub import load_checkpoint_folder, push_to_hub, save_pretrained
from spformer.hub.cli import main as hub_cli
from spformer.hub.testing import FakeHub
from spformer.models import pretrained as pretrained_module
from spformer.models.pretrained import HF_HUB_ORG, PUBLISHED_WEIGHTS, PretrainedWeightsUnavailable

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = 'spformer_tiny_sp16_224'
IMG = 64  # 4x4 tokens: fast
LABELS = ['cat', 'dog', 'owl', 'fox', 'eel', 'yak']  # 6: top-5 means something
PUBLISHED = {'config.json', 'model.safetensors', 'README.md', 'superpixels.png'}
TOKEN = 'hf_fake_token'


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(autouse=True)
def hub_home(tmp_path, monkeypatch):
    """A fresh Hub cache and no stored token, in this process (constants are read at import) and subprocesses."""
    home = tmp_path / 'hf_home'
    monkeypatch.setenv('HF_HOME', str(home))
    monkeypatch.delenv('HF_HUB_CACHE', raising=False)
    monkeypatch.delenv('HUGGINGFACE_HUB_CACHE', raising=False)
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(home / 'hub'))
    monkeypatch.setattr(constants, 'HF_TOKEN_PATH', str(home / 'token'))
    monkeypatch.setattr(constants, 'HF_STORED_TOKENS_PATH', str(home / 'stored_tokens'))
    return home


@pytest.fixture
def fake_hub(monkeypatch):
    """The in-memory Hub, installed as huggingface_hub's HTTP client.

    conftest.py sets HF_HUB_OFFLINE=1 so that no test can reach the network; the client then refuses
    every request before it is sent. Requests to the fake never leave this process, so these tests
    turn offline mode off for their own duration only (the constant the client reads at call time).
    """
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    hub = FakeHub()
    with hub.installed():
        yield hub


def _train(num_classes: int, seed: int):
    """A few SGD steps on random data, with an EMA of the weights (so the two differ)."""
    torch.manual_seed(seed)
    model = timm.create_model(TINY, img_size=IMG, num_classes=num_classes)
    ema = ModelEmaV3(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        x, y = torch.randn(4, 3, IMG, IMG), torch.randint(0, num_classes, (4,))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
    return model.eval(), ema.module.eval()


@pytest.fixture(scope='module')
def trained():
    return _train(len(LABELS), seed=0)


@pytest.fixture(scope='module')
def x():
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope='module')
def train_folder(trained, tmp_path_factory):
    """A training output folder as train_imagenet.py writes it, made with timm's own save_for_hf."""
    model, ema = trained
    folder = tmp_path_factory.mktemp('run') / 'final'
    save_for_hf(model, folder, model_config=dict(label_names=LABELS), safe_serialization=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in ema.state_dict().items()},
                                str(folder / 'model_ema.safetensors'))
    (folder / 'train_config.yaml').write_text(
        '# effective configuration\n' + yaml.safe_dump(dict(model=TINY, hf_dataset='ILSVRC/imagenet-1k',
                                                            epochs=3, lr=0.05, img_size=IMG)))
    (folder / 'results.json').write_text(json.dumps(
        dict(model=TINY, epochs=3, top1=41.25, top5=88.5, top1_ema=43.75, top5_ema=90.0)))
    return folder


def _logits(model, x):
    with torch.inference_mode():
        return model.eval()(x)


def _front_matter(card: str) -> dict:
    m = re.match(r'^---\n(.*?)\n---\n', card, re.S)
    assert m, card[:200]
    return yaml.safe_load(m.group(1))


def _run_python(code: str, *args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """A fresh interpreter (nothing of this process's timm/hub state), same threads as conftest."""
    env = dict(os.environ, **(env or {}))
    proc = subprocess.run([sys.executable, '-c', textwrap.dedent(code), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


# Load a model in a fresh process, optionally serving the saved fake Hub there, and write its logits.
_LOAD_SCRIPT = '''
import sys, torch, safetensors.torch
torch.set_num_threads(max(1, min(2, __import__('os').cpu_count() or 1)))
state, name, x_path, out_path = sys.argv[1:5]
import spformer  # registers the SPFormer models with timm: all a user needs before create_model
import timm
if state != '-':
    from spformer.hub.testing import FakeHub
    with FakeHub.load(state).installed():
        model = timm.create_model(name, pretrained=True, **eval(sys.argv[5]))
else:
    model = timm.create_model(name, pretrained=True, **eval(sys.argv[5]))
x = safetensors.torch.load_file(x_path)['x']
with torch.inference_mode():
    logits = model.eval()(x)
safetensors.torch.save_file({'logits': logits.contiguous()}, out_path)
print(model.pretrained_cfg.get('source'), model.pretrained_cfg.get('hf_hub_id'), model.pretrained_cfg.get('label_names'))
'''


def _load_in_fresh_process(tmp_path, name, x, state='-', env=None, **kwargs):
    safetensors.torch.save_file({'x': x.contiguous()}, str(tmp_path / 'x.safetensors'))
    proc = _run_python(_LOAD_SCRIPT, state, name, tmp_path / 'x.safetensors', tmp_path / 'logits.safetensors',
                       repr(kwargs), env=env)
    return safetensors.torch.load_file(str(tmp_path / 'logits.safetensors'))['logits'], proc.stdout


# ------------------------------------------------------------------------------------------ acceptance

def test_push_training_folder_to_fake_hub_and_load_hf_hub_id_in_fresh_process(
        fake_hub, train_folder, trained, x, tmp_path):
    model, ema = trained
    repo = 'spformer-test/tiny-64'
    url = push_to_hub(train_folder, repo, token=TOKEN)

    # One commit with exactly the published files, through the real client's endpoints.
    commits = fake_hub.commits(repo)
    assert url == f'{constants.ENDPOINT}/{repo}/commit/{commits[-1].oid}'
    assert sorted(commits[-1].added) == sorted(PUBLISHED) and commits[-1].deleted == []
    assert set(fake_hub.files(repo)) == PUBLISHED | {'.gitattributes'}  # .gitattributes: the Hub's, at creation
    assert ('POST', f'/api/models/{repo}/commit/main') in fake_hub.requests

    files = fake_hub.files(repo)
    # The EMA weights were pushed (as model.safetensors), tensor for tensor, under plain key names.
    pushed = load_safetensors_bytes(files['model.safetensors'])
    ema_file = safetensors.torch.load_file(str(train_folder / 'model_ema.safetensors'))
    assert pushed.keys() == ema_file.keys() == ema.state_dict().keys()
    assert all(torch.equal(pushed[k], ema_file[k]) for k in pushed)
    assert not all(torch.equal(pushed[k], v) for k, v in model.state_dict().items())  # not the raw weights

    config = json.loads(files['config.json'])
    assert config['architecture'] == TINY and config['num_classes'] == 6 and config['num_features'] == 192
    assert config['label_names'] == LABELS
    assert config['model_args']['img_size'] == [IMG, IMG] and 'attn_backend' not in config['model_args']
    assert config['pretrained_cfg']['input_size'] == [3, IMG, IMG]

    card = files['README.md'].decode()
    meta = _front_matter(card)
    assert meta['library_name'] == 'timm'
    assert {'image-classification', 'timm', 'spformer'} <= set(meta['tags'])
    assert meta['license'] == 'apache-2.0'
    assert meta['datasets'] == ['imagenet-1k']  # from train_config.yaml's hf_dataset
    assert meta['metrics'] == ['accuracy', 'top_5_accuracy']
    reported = {m['name']: m['value'] for m in meta['model-index'][0]['results'][0]['metrics']}
    assert reported == {'Top-1 accuracy': 43.75, 'Top-5 accuracy': 90.0}  # the EMA results: EMA weights
    usage = re.search(r'## Usage\n\n```python\n(.*?)```', card, re.S).group(1)
    assert usage.splitlines()[0].startswith('import spformer')
    assert f"timm.create_model('hf-hub:{repo}', pretrained=True)" in usage
    train_cfg = yaml.safe_load(re.search(r'## Training configuration\n\n```yaml\n(.*?)```', card, re.S).group(1))
    assert train_cfg == yaml.safe_load((train_folder / 'train_config.yaml').read_text())
    assert '| top1_ema | 43.75 | EMA (published) |' in card and '| top1 | 41.25 | model |' in card
    assert '![Superpixels of tiny-64](superpixels.png)' in card
    assert files['superpixels.png'][:8] == b'\x89PNG\r\n\x1a\n' and len(files['superpixels.png']) > 20_000

    # A fresh process that only imports spformer and timm loads it with timm's hf-hub: path, served by
    # the same repos (the fake cannot be shared across processes: its state is saved and served there).
    logits, out = _load_in_fresh_process(tmp_path, f'hf-hub:{repo}', x, state=fake_hub.save(tmp_path / 'hub'),
                                         env=dict(HF_HUB_OFFLINE='0'))
    assert out.split()[:2] == ['hf-hub', repo]
    assert torch.equal(logits, _logits(ema, x))


def test_tags_name_a_hub_repo_only_when_published(monkeypatch):
    # timm lists a model as pretrained, and its tests load it, when its cfg names a source: ours do only once
    # the tag is in PUBLISHED_WEIGHTS (none yet).
    assert timm.list_models('spformer*', pretrained=True) == sorted(
        n for n in timm.list_models('spformer*', pretrained=True, include_tags=True) if n in PUBLISHED_WEIGHTS)
    assert timm.models.get_pretrained_cfg(f'{TINY}.in1k').hf_hub_id is None
    assert pretrained_module.published_source(f'{TINY}.in1k') == {}
    monkeypatch.setattr(pretrained_module, 'PUBLISHED_WEIGHTS', (f'{TINY}.in1k',))
    assert pretrained_module.published_source(f'{TINY}.in1k') == dict(hf_hub_id=f'{HF_HUB_ORG}/{TINY}.in1k')


@pytest.mark.parametrize('name', [TINY, 'spformer_small_sp32_448'])  # one path for all; every cfg's id is checked below
def test_unpublished_weights_fail_at_once_with_how_to(name):
    # Offline with an empty cache (the conftest + fixture state): no Hub stack trace, a clear message.
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        timm.create_model(name, pretrained=True)
    msg = str(info.value)
    assert f'no weights are published for {name}.in1k yet' in msg
    assert "'hf-hub:ORG/NAME'" in msg and 'pretrained_cfg_overlay=dict(file=' in msg


def test_unpublished_weights_online_fail_without_a_request(fake_hub):
    # Online, an unpublished tag that is not in the local cache fails before asking the Hub (whose
    # client would otherwise retry an unreachable host for about a minute).
    with pytest.raises(PretrainedWeightsUnavailable, match='no weights are published'):
        timm.create_model(TINY, pretrained=True, img_size=IMG)
    hub_requests = [r for r in fake_hub.requests if 'agent-harnesses' not in r[1]]
    assert hub_requests == []


def test_pushed_hf_hub_id_still_asks_the_hub(fake_hub, trained, x):
    # The shortcut above is only for the registered, unpublished tags: an hf-hub: id always goes to the Hub.
    model, _ = trained
    push_to_hub(model, 'someone/tiny', token=TOKEN)
    loaded = timm.create_model('hf-hub:someone/tiny', pretrained=True)
    assert torch.equal(_logits(loaded, x), _logits(model, x))
    assert fake_hub.requests, 'the hf-hub: id was loaded without asking the Hub'


def test_missing_local_file_fails_clearly(tmp_path):
    missing = tmp_path / 'nope.safetensors'
    with pytest.raises(PretrainedWeightsUnavailable, match=f'file {missing}'):
        timm.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))


def test_config_naming_another_variant_is_refused_naming_both(train_folder):
    with pytest.raises(ValueError) as info:
        load_checkpoint_folder(train_folder, model_name='spformer_small_sp16_224')
    assert TINY in str(info.value) and 'spformer_small_sp16_224' in str(info.value)


def test_tensors_of_another_variant_are_refused_naming_both(train_folder, tmp_path):
    # A config that names spformer_small_sp16_224 over tiny weights: timm builds small, the filter refuses.
    folder = tmp_path / 'relabelled'
    folder.mkdir()
    config = json.loads((train_folder / 'config.json').read_text())
    config['architecture'] = 'spformer_small_sp16_224'
    (folder / 'config.json').write_text(json.dumps(config))
    (folder / 'model.safetensors').write_bytes((train_folder / 'model.safetensors').read_bytes())
    with pytest.raises(ValueError) as info:
        load_checkpoint_folder(folder)
    msg = str(info.value)
    assert 'does not fit spformer_small_sp16_224' in msg and f'tensors are those of {TINY}' in msg
    assert 'stem.conv.weight: checkpoint (32, 3, 4, 4) vs model (64, 3, 4, 4)' in msg

    # The same through timm's file path, and for a state dict of no registered variant.
    with pytest.raises(ValueError, match=f'does not fit spformer_small_sp32_224.*those of {TINY}'):
        timm.create_model('spformer_small_sp32_224', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(train_folder / 'model.safetensors')))
    state = safetensors.torch.load_file(str(train_folder / 'model.safetensors'))
    state['stem.extra'] = torch.zeros(1)
    safetensors.torch.save_file(state, str(tmp_path / 'extra.safetensors'))
    with pytest.raises(ValueError, match=f'does not fit {TINY}.*no registered SPFormer variant.*stem.extra'):
        timm.create_model(TINY, pretrained=True, img_size=IMG, num_classes=5,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'extra.safetensors'), num_classes=5))


# ------------------------------------------------------------------------------------------ wrapped checkpoints

# Key names of wrapped models' state dicts: DistributedDataParallel / DataParallel ('module.'),
# torch.compile ('_orig_mod.'), DDP around a compiled model, that with a compiled submodule, and
# torch.compile around DDP.
WRAPPED_KEYS = {
    'plain': lambda k: k,
    'ddp': lambda k: 'module.' + k,
    'compile': lambda k: '_orig_mod.' + k,
    'ddp_compile': lambda k: 'module._orig_mod.' + k,
    'ddp_compile_nested': lambda k: 'module._orig_mod.' + k.replace('stages.0.', 'stages.0._orig_mod.', 1),
    'compile_ddp': lambda k: '_orig_mod.module.' + k,
}


def _save_wrapped(model, wrap, file):
    state = {WRAPPED_KEYS[wrap](k): v.contiguous() for k, v in model.state_dict().items()}
    assert wrap == 'plain' or not state.keys() & model.state_dict().keys()  # every key is wrapped
    file.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, str(file))
    return file


@pytest.mark.parametrize('wrap', list(WRAPPED_KEYS))
def test_wrapped_safetensors_header_gives_head_grid_and_config(wrap, trained, train_folder, tmp_path):
    """A weights file saved from a wrapped model describes the model itself: the head size and token grid
    read from its keys are those of the in-memory model it was saved from (6 classes, 64 px with 16 px
    tokens: 4x4, not the registered 1000 / 14x14), and the run's config.json beside it is recognised."""
    from spformer.hub.checkpoint import checkpoint_tensor_info
    model, _ = trained
    file = _save_wrapped(model, wrap, tmp_path / 'bare' / 'w.safetensors')
    info = checkpoint_tensor_info(file)
    assert info.num_classes == len(LABELS) and info.grid == (IMG // 16, IMG // 16)
    assert info.shapes == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert info.config is None  # no config.json beside it
    # Beside the run's config.json (6 classes): taken as describing the file only when the head size read
    # from the keys matches it; the file then names its own model.
    beside = _save_wrapped(model, wrap, tmp_path / 'with_config' / 'w.safetensors')
    (beside.parent / 'config.json').write_text((train_folder / 'config.json').read_text())
    info = checkpoint_tensor_info(beside)
    assert info.architecture == TINY and info.label_names == LABELS
    # A config of a 10-class run beside these 6-class weights does not describe them.
    other = _save_wrapped(model, wrap, tmp_path / 'other_config' / 'w.safetensors')
    config = json.loads((train_folder / 'config.json').read_text())
    (other.parent / 'config.json').write_text(json.dumps(dict(config, num_classes=10)))
    info = checkpoint_tensor_info(other)
    assert info.num_classes == len(LABELS) and info.config is None and info.architecture is None


@pytest.mark.parametrize('wrap', ['ddp', 'compile', 'ddp_compile_nested', 'compile_ddp'])
def test_wrapped_safetensors_load_with_the_logits_of_the_model_saved(wrap, trained, x, tmp_path):
    # NAME=FILE: the model is built with the file's head and input size, and computes what the in-memory
    # model it was saved from computes (an unstripped head would leave num_classes 0 and 224 px).
    from spformer.hub.checkpoint import load_model
    model, _ = trained
    file = _save_wrapped(model, wrap, tmp_path / 'w.safetensors')
    loaded = load_model(f'{TINY}={file}', argument='--model').model
    assert loaded.num_classes == len(LABELS) and tuple(loaded.img_size) == (IMG, IMG)
    assert torch.equal(_logits(loaded, x), _logits(model, x))


def test_registered_cfgs_name_hub_repos_when_published_and_readme_says_unpublished():
    readme = (ROOT / 'README.md').read_text()
    for name in timm.list_models('spformer_*'):
        cfg = timm.models.get_pretrained_cfg(f'{name}.in1k')
        published = f'{name}.in1k' in PUBLISHED_WEIGHTS
        assert cfg.hf_hub_id == (f'{HF_HUB_ORG}/{name}.in1k' if published else None)
        row = next(line for line in readme.splitlines() if line.startswith(f'| `{name}` |'))
        if f'{name}.in1k' not in PUBLISHED_WEIGHTS:
            assert row.endswith('| none published yet |'), row


# ------------------------------------------------------------------------------------------ save_pretrained

def test_save_pretrained_writes_exactly_the_hub_files_and_loads_back_with_timm(trained, x, tmp_path):
    model, _ = trained
    out = save_pretrained(model, tmp_path / 'out', label_names=LABELS, metrics=dict(top1=41.25),
                          train_config=dict(data_dir='/data/imagenet', epochs=3))
    assert {p.name for p in out.iterdir()} == PUBLISHED
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)  # timm's own local-folder loader
    assert torch.equal(_logits(loaded, x), _logits(model, x))
    assert loaded.pretrained_cfg['label_names'] == LABELS
    card = (out / 'README.md').read_text()
    meta = _front_matter(card)
    # A 6-class model trained on a local folder named imagenet is not ImageNet-1k: no dataset, no tag, no path.
    assert 'datasets' not in meta and meta['metrics'] == ['accuracy'] and 'model-index' not in meta
    assert '- **Dataset:** a local image folder, not on the Hub' in card
    assert '/data/imagenet' not in card and 'data_dir' not in card and 'epochs: 3' in card
    assert 'tag' not in json.loads((out / 'config.json').read_text())['pretrained_cfg']
    assert 'These are the exponential-moving-average' not in card


@pytest.mark.parametrize('wrap', ['ddp_compile_nested', 'model_ema'])
def test_save_pretrained_strips_wrappers_from_key_names(trained, tmp_path, wrap):
    model, _ = trained
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    if wrap == 'ddp_compile_nested':
        # DataParallel (keys 'module.*', as DDP's) around torch.compile ('_orig_mod.*') around a model with a
        # compiled submodule ('stages.0._orig_mod.*'); nothing is ever called, so nothing compiles.
        inner = timm.create_model(TINY, img_size=IMG, num_classes=len(LABELS))
        inner.load_state_dict(expected)
        inner.stages[0] = torch.compile(inner.stages[0])
        wrapped = torch.nn.DataParallel(torch.compile(inner))
        assert any(k.startswith('module._orig_mod.stages.0._orig_mod.') for k in wrapped.state_dict())
    else:
        wrapped = ModelEmaV3(model, decay=0.9)
        expected = {k: v.clone() for k, v in wrapped.module.state_dict().items()}
    save_pretrained(wrapped, tmp_path, label_names=LABELS)
    saved = safetensors.torch.load_file(str(tmp_path / 'model.safetensors'))
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    assert json.loads((tmp_path / 'config.json').read_text())['architecture'] == TINY


def test_save_pretrained_imagenet_label_names_and_sample_image(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(TINY, img_size=IMG)
    image = torch.randint(0, 256, (80, 96, 3), dtype=torch.uint8).numpy()
    save_pretrained(model, tmp_path, train_config=dict(hf_dataset='imagenet-1k'), sample_image=image)
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['label_names'] == list(timm.data.ImageNetInfo().label_names())
    card = (tmp_path / 'README.md').read_text()
    assert 'on a sample image' in card
    assert 'No training configuration or evaluation results' not in card


def test_save_pretrained_rejects_bad_input(trained, tmp_path):
    model, _ = trained
    with pytest.raises(TypeError, match='model must be an SPFormer.*got Linear'):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path)
    with pytest.raises(ValueError, match='label_names has 2 names but the model has num_classes=6'):
        save_pretrained(model, tmp_path, label_names=['a', 'b'])
    with pytest.raises(TypeError, match='label_names must be a list of strings, got str'):
        save_pretrained(model, tmp_path, label_names='abcde')
    with pytest.raises(TypeError, match='metrics must be a dict.*got list'):
        save_pretrained(model, tmp_path, metrics=[1, 2])
    with pytest.raises(TypeError, match='sample_image must be None.*got int'):
        save_pretrained(model, tmp_path, sample_image=3)
    with pytest.raises(ValueError, match="repo_id must be 'ORG/NAME'.*got 'no-namespace'"):
        push_to_hub(model, 'no-namespace')
    (tmp_path / 'bare').mkdir()
    safetensors.torch.save_file(model.state_dict(), str(tmp_path / 'bare' / 'x.safetensors'))  # no config.json
    with pytest.raises(ValueError, match='needs model_name.*no config.json beside it names one'):
        push_to_hub(tmp_path / 'bare' / 'x.safetensors', 'org/name')
    with pytest.raises(FileNotFoundError, match='is neither a folder nor a file'):
        push_to_hub(tmp_path / 'missing.safetensors', 'org/name')


# ------------------------------------------------------------------------------------------ CLI

def test_cli_push_no_ema_private_revision_and_download(fake_hub, train_folder, trained, capsys, monkeypatch):
    model, _ = trained
    repo = 'spformer-test/cli'
    assert hub_cli(['push', str(train_folder), '--repo-id', repo, '--private', '--revision', 'v1', '--no-ema',
                    '--token', TOKEN]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0] == f'weights : {train_folder / "model.safetensors"}: model weights, as asked'
    url = printed[-1]
    assert fake_hub.repos[repo].private and set(fake_hub.repos[repo].branches) == {'main', 'v1'}
    assert url.endswith(fake_hub.repos[repo].branches['v1'])
    assert set(fake_hub.files(repo, 'main')) == {'.gitattributes'}  # main untouched
    files = fake_hub.files(repo, 'v1')
    pushed = load_safetensors_bytes(files['model.safetensors'])
    assert all(torch.equal(pushed[k], v) for k, v in model.state_dict().items())  # --no-ema: the model weights
    card = files['README.md'].decode()
    assert "timm.create_model('hf-hub:spformer-test/cli@v1', pretrained=True)" in card
    assert 'These are the model (not the EMA) weights of the training run: model weights, as asked.' in card
    assert 'exponential-moving-average' not in card and '| top1 | 41.25 | model (published) |' in card
    assert {m['value'] for m in _front_matter(card)['model-index'][0]['results'][0]['metrics']} == {41.25, 88.5}

    # Private: anonymous downloads are refused as on the Hub; with the token they work.
    with pytest.raises(SystemExit, match='RepositoryNotFoundError'):
        hub_cli(['download', repo, '--revision', 'v1'])
    assert hub_cli(['download', repo, '--revision', 'v1', '--token', TOKEN]) == 0
    path = pathlib.Path(capsys.readouterr().out.strip())
    assert path.is_relative_to(constants.HF_HUB_CACHE)
    assert {p.name for p in path.iterdir()} == PUBLISHED
    assert (path / 'model.safetensors').read_bytes() == files['model.safetensors']


def test_cli_push_single_safetensors_file_and_replace_pickles(fake_hub, train_folder, trained, x, capsys):
    model, _ = trained
    repo = 'spformer-test/single'
    api = HfApi(token=TOKEN)
    api.create_repo(repo)
    api.upload_file(path_or_fileobj=b'old pickle', path_in_repo='pytorch_model.bin', repo_id=repo)
    weights = train_folder / 'model.safetensors'
    assert hub_cli(['push', str(weights), '--model', TINY, '--repo-id', repo, '--token', TOKEN]) == 0
    assert set(fake_hub.files(repo)) == PUBLISHED | {'.gitattributes'}  # the pickle is gone
    assert fake_hub.commits(repo)[-1].deleted == ['pytorch_model.bin']
    config = json.loads(fake_hub.files(repo)['config.json'])
    assert config['num_classes'] == 6 and config['model_args']['img_size'] == [IMG, IMG]  # from the tensors
    pushed = load_safetensors_bytes(fake_hub.files(repo)['model.safetensors'])
    assert all(torch.equal(pushed[k], v) for k, v in model.state_dict().items())

    # The wrong variant for those tensors: refused before anything is pushed, naming both.
    commits = len(fake_hub.commits(repo))
    with pytest.raises(SystemExit, match=f'config.json says the file holds {TINY} weights, not '
                                         f'spformer_small_sp16_224; pass {TINY}='):
        hub_cli(['push', str(weights), '--model', 'spformer_small_sp16_224', '--repo-id', repo, '--token', TOKEN])
    bare = weights.parent.parent / 'bare'  # the same tensors without the config.json beside them
    bare.mkdir(exist_ok=True)
    (bare / 'w.safetensors').write_bytes(weights.read_bytes())
    with pytest.raises(SystemExit, match=f'does not fit spformer_small_sp16_224.*those of {TINY}'):
        hub_cli(['push', str(bare / 'w.safetensors'), '--model', 'spformer_small_sp16_224', '--repo-id', repo,
                 '--token', TOKEN])
    assert len(fake_hub.commits(repo)) == commits


def test_cli_rejects_bad_input(fake_hub, train_folder, tmp_path):
    with pytest.raises(SystemExit, match="repo_id must be 'ORG/NAME'.*got 'bad'"):
        hub_cli(['push', str(train_folder), '--repo-id', 'bad', '--token', TOKEN])
    (tmp_path / 'w.safetensors').write_bytes((train_folder / 'model.safetensors').read_bytes())
    with pytest.raises(SystemExit, match='needs model_name'):  # no config.json beside it
        hub_cli(['push', str(tmp_path / 'w.safetensors'), '--repo-id', 'o/n', '--token', TOKEN])
    (tmp_path / 'model.pth').write_bytes(b'pickle')
    with pytest.raises(SystemExit, match=r'is not a \.safetensors weights file; expected one \(pickled weights'):
        hub_cli(['push', str(tmp_path / 'model.pth'), '--model', TINY, '--repo-id', 'o/n', '--token', TOKEN])
    with pytest.raises(SystemExit, match="model_name='resnet50' is not an SPFormer variant"):
        hub_cli(['push', str(tmp_path / 'w.safetensors'), '--model', 'resnet50', '--repo-id', 'o/n'])
    with pytest.raises(SystemExit, match='has neither model.safetensors nor model_ema.safetensors.*model.pth'):
        (tmp_path / 'config.json').write_text((train_folder / 'config.json').read_text())
        hub_cli(['push', str(tmp_path), '--repo-id', 'o/n', '--token', TOKEN])
    with pytest.raises(SystemExit, match='not a published SPFormer'):
        HfApi(token=TOKEN).create_repo('o/empty')
        hub_cli(['download', 'o/empty'])
    assert 'o/n' not in fake_hub.repos  # nothing was created by a refused push


def test_cli_export_is_the_pushed_folder(train_folder, tmp_path, capsys):
    assert hub_cli(['export', str(train_folder), str(tmp_path / 'out'), '--repo-id', 'org/name']) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0] == (f'weights : {train_folder / "model_ema.safetensors"}: EMA weights validated better: '
                          'top-1 43.75 vs 41.25 for the model weights')
    out = pathlib.Path(printed[-1])
    assert {p.name for p in out.iterdir()} == PUBLISHED
    pushed = safetensors.torch.load_file(str(out / 'model.safetensors'))
    ema = safetensors.torch.load_file(str(train_folder / 'model_ema.safetensors'))
    assert all(torch.equal(pushed[k], ema[k]) for k in ema)


# ------------------------------------------------------------------------------------------ the real Hub

def _real_hub_skip_reason():
    if not os.environ.get('HF_TOKEN'):
        return 'real-Hub test: needs HF_TOKEN (a write token) and network access to huggingface.co; HF_TOKEN is unset'
    try:
        socket.create_connection(('huggingface.co', 443), timeout=3).close()
    except OSError as e:
        return f'real-Hub test: HF_TOKEN is set but huggingface.co:443 is unreachable ({e})'
    return None


_REAL_HUB_TOKEN = os.environ.get('HF_TOKEN')
_REAL_HUB_SKIP = _real_hub_skip_reason()


@pytest.mark.skipif(_REAL_HUB_SKIP is not None, reason=_REAL_HUB_SKIP or '')
def test_real_hub_push_and_load_private_repo(trained, x, monkeypatch, tmp_path):
    # The real Hub: conftest's offline mode is turned off for this test only.
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    _, ema = trained
    api = HfApi(token=_REAL_HUB_TOKEN)
    repo = f"{api.whoami()['name']}/spformer-hub-test-{uuid.uuid4().hex[:8]}"
    try:
        url = push_to_hub(ema, repo, private=True, token=_REAL_HUB_TOKEN, label_names=LABELS)
        assert url.startswith(f'{constants.ENDPOINT}/{repo}/commit/')
        assert set(api.list_repo_files(repo)) == PUBLISHED | {'.gitattributes'}
        logits, _ = _load_in_fresh_process(tmp_path, f'hf-hub:{repo}', x,
                                           env=dict(HF_HUB_OFFLINE='0', HF_TOKEN=_REAL_HUB_TOKEN))
        assert torch.equal(logits, _logits(ema, x))
    finally:
        api.delete_repo(repo, missing_ok=True)


def test_load_model_names_the_argument_for_an_unreachable_hub_repo():
    # Offline with an empty cache (conftest + fixture): one line naming the argument, not a Hub traceback.
    from spformer.hub import ModelReferenceError, load_model
    with pytest.raises(ModelReferenceError, match=r"^--model 'hf-hub:someone/nothing': LocalEntryNotFoundError"):
        load_model('hf-hub:someone/nothing', argument='--model')


# ------------------------------------------------------------------------------------------ images and CLI errors

def test_cli_names_a_bad_sample_image_or_out_dir_before_loading_anything(fake_hub, train_folder, tmp_path, monkeypatch):
    import spformer.hub.publish

    def refuse(*args, **kwargs):
        raise AssertionError('the checkpoint was loaded before the cheap checks')
    monkeypatch.setattr(spformer.hub.publish, '_load_source', refuse)
    notes = tmp_path / 'notes.txt'
    notes.write_text('a text file, not a picture')
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as e:
        hub_cli(['export', str(train_folder), str(out), '--sample-image', str(notes)])
    assert str(e.value).startswith(f"spformer-hub export: --sample-image: cannot read image '{notes}': not an image")
    assert not out.exists()
    with pytest.raises(SystemExit) as e:
        hub_cli(['export', str(train_folder), str(notes)])
    assert str(e.value) == f"spformer-hub export: OUT_DIR '{notes}' is a file, not a folder"
    with pytest.raises(SystemExit, match=f"^spformer-hub push: --sample-image: cannot read image '{tmp_path / 'no.png'}': "
                                         f"no such file$"):
        hub_cli(['push', str(train_folder), '--repo-id', 'o/n', '--token', TOKEN, '--sample-image',
                 str(tmp_path / 'no.png')])
    assert 'o/n' not in fake_hub.repos  # refused before the repo was created
    with pytest.raises(SystemExit, match=f"^spformer-hub export: --label-names '{tmp_path / 'no.json'}': No such file"):
        hub_cli(['export', str(train_folder), str(out), '--label-names', str(tmp_path / 'no.json')])


def test_cli_debug_variable_reraises_with_the_traceback(train_folder, tmp_path, monkeypatch, capsys):
    from spformer.images import ImageReadError
    (tmp_path / 'empty.png').write_bytes(b'')
    argv = ['export', str(train_folder), str(tmp_path / 'out'), '--sample-image', str(tmp_path / 'empty.png')]
    for name in ('SPFORMER_DEBUG', 'SPFORMER_HUB_DEBUG'):  # one variable for every script; the old name still works
        monkeypatch.setenv(name, '1')
        with pytest.raises(ImageReadError, match='the file is empty'):
            hub_cli(argv)
        monkeypatch.delenv(name)
    with pytest.raises(SystemExit, match='the file is empty'):
        hub_cli(argv)
    for command in ([], ['push'], ['export'], ['download']):
        with pytest.raises(SystemExit):
            hub_cli(command + ['--help'])
        assert 'SPFORMER_DEBUG=1' in capsys.readouterr().out.replace('\n', ' '), command


def test_card_picture_of_a_16bit_sample_image_is_that_of_its_8bit_original(tmp_path):
    from PIL import Image
    from skimage.data import camera
    from spformer.hub.card import _load_image, save_superpixel_picture
    torch.manual_seed(0)
    model = timm.create_model(TINY, img_size=IMG).eval()
    grey = camera()[::8, ::8]
    Image.fromarray(grey).save(tmp_path / 'grey8.png')
    Image.fromarray(grey.astype('uint16') * 257).save(tmp_path / 'grey16.png')  # PIL mode 'I;16'
    for name in ('grey8', 'grey16'):
        save_superpixel_picture(model, tmp_path / f'{name}_sp.png', tmp_path / f'{name}.png')
    assert (tmp_path / 'grey16_sp.png').read_bytes() == (tmp_path / 'grey8_sp.png').read_bytes()
    with Image.open(tmp_path / 'grey16.png') as image:
        as_pil = _load_image(image)  # a PIL image goes through spformer.images.to_rgb
    assert as_pil.mode == 'RGB' and as_pil.tobytes() == Image.fromarray(grey).convert('RGB').tobytes()


@pytest.mark.parametrize('results, ema, words', [
    # Higher top-1 wins, whichever way round.
    (dict(top1=60.0, top1_ema=70.0, loss=1.0, loss_ema=2.0), True, 'top-1 70.00 vs 60.00'),
    (dict(top1=70.0, top1_ema=60.0, loss=2.0, loss_ema=1.0), False, 'top-1 70.00 vs 60.00'),
    # Equal top-1: the lower validation loss wins.
    (dict(top1=50.0, top1_ema=50.0, loss=1.5, loss_ema=1.25), True, 'loss 1.2500 vs 1.5000'),
    (dict(top1=50.0, top1_ema=50.0, loss=1.25, loss_ema=1.5), False, 'loss 1.2500 vs 1.5000'),
    # A full tie, or a tie without losses: the weights themselves (the EMA adds nothing).
    (dict(top1=50.0, top1_ema=50.0, loss=1.5, loss_ema=1.5), False, 'equally'),
    (dict(top1=50.0, top1_ema=50.0), False, 'equally'),
])
def test_choose_weights_by_hand(results, ema, words):
    """spformer.hub.choose_weights, the one rule for which of a run's weights are published and loaded:
    higher top-1, then lower loss, then the model weights; the reason names the deciding numbers."""
    from spformer.hub import choose_weights
    choice = choose_weights(dict(results, samples=36))
    assert choice.ema is ema
    assert choice.file_name == ('model_ema.safetensors' if ema else 'model.safetensors')
    assert words in choice.reason and 'on 36 validation images' in choice.reason
    if words == 'equally':
        assert choice.reason.endswith('the model weights')


@pytest.mark.parametrize('results', [None, {}, dict(top1=50.0), dict(top1=50.0, top1_ema=float('nan')),
                                     dict(top1=True, top1_ema=50.0), dict(top1='50', top1_ema=50.0)])
def test_choose_weights_needs_both_top1_numbers(results):
    from spformer.hub import choose_weights
    assert choose_weights(results) is None


def test_spformer_variant_strips_the_pretrained_tag_and_refuses_other_models():
    from spformer.hub.checkpoint import spformer_variant
    assert spformer_variant('spformer_small_sp16_224') == 'spformer_small_sp16_224'
    assert spformer_variant('spformer_small_sp16_224.in1k_ft') == 'spformer_small_sp16_224'
    with pytest.raises(ValueError, match=r"--model='resnet18' is not an SPFormer variant"):
        spformer_variant('resnet18', argument='--model')


def test_another_timm_model_loads_from_name_and_file_with_its_head(tmp_path):
    """NAME=FILE works for any timm model: a non-SPFormer model is built with the head size of the file (7
    classes here, from the classifier's rows, not its 1000 default nor its input width) and computes what
    the model it was saved from computes."""
    from spformer.hub.checkpoint import load_model
    torch.manual_seed(0)
    model = timm.create_model('test_vit', num_classes=7).eval()
    file = tmp_path / 'w.safetensors'
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(file))
    loaded = load_model(f'test_vit={file}', argument='--model').model.eval()
    assert loaded.num_classes == 7
    x = torch.randn(2, 3, *model.pretrained_cfg['input_size'][1:])
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize('num_classes, datasets, tag', [
    (1000, ['imagenet-1k'], 'in1k'), (1000, ['my-photos'], None), (1000, [], None), (6, ['imagenet-1k'], None)])
def test_config_json_names_the_model_not_the_run(num_classes, datasets, tag, tmp_path):
    """config.json (spformer.hub.publish.save_config) describes weights that are not the registered ones: the
    pretrained tag 'in1k' only for a 1000-class model trained on ImageNet-1k, and no run-time argument
    (attn_backend: a property of the machine, not of the weights) among the model_args."""
    from spformer.hub.publish import save_config
    model = timm.create_model(TINY, num_classes=num_classes, img_size=IMG, attn_backend='torch')
    config = save_config(model, tmp_path / 'config.json', datasets=datasets)
    assert json.loads((tmp_path / 'config.json').read_text()) == config
    assert config['architecture'] == TINY and config['num_classes'] == num_classes
    assert 'attn_backend' not in config.get('model_args', {})
    assert config['pretrained_cfg'].get('tag') == tag
