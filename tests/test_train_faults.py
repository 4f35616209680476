"""train_imagenet.py under the faults users met, each made the way it happens: a planted pickle, a truncated or
damaged checkpoint file, a torn metrics line, two runs on one --output, unreadable images, ill-typed YAML values,
and kill -9 at random moments (20 kills, seeded) with --resume latest after each; and no pickle is loaded
anywhere without the weights-only restriction.

Every training run uses the 32-px recipe of tests/test_train.py (the full DeiT recipe, 3 updates per epoch,
2 epochs) with a checkpoint after every update and no loader workers unless workers are the point.
"""
import ast
import contextlib
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from test_train import ROOT, SCRIPT, free_port, make_shapes, read_jsonl, recipe_args, run, run_env, train_cmd

UPDATES = 6  # 48 images / (batch 8 x 2 accumulation) = 3 updates per epoch, 2 epochs
CONFIG_LINE = 'process(es) x batch'  # printed once the model and data are ready, before any resume
ERROR = 'train_imagenet.py: error: '
UNRESTRICTED = 'weights_only=' + 'False'  # (spelled so that the source scan of test_h does not flag this file)


def fault_args(data: Path, output: Path, *extra) -> list:
    return recipe_args(data, output, '--checkpoint-every', 1, '--workers', 0, *extra)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def final_digests(out: Path) -> dict:
    return {name: sha256(out / 'final' / name) for name in ('model.safetensors', 'model_ema.safetensors')}


def metric_trace(out: Path) -> list:
    return [(r['kind'], r['update'], r.get('loss'), r.get('top1')) for r in read_jsonl(out / 'metrics.jsonl')]


def start(cmd, log: Path, env=None) -> subprocess.Popen:
    """A training process writing its stdout and stderr to log.out / log.err (files: nothing can block)."""
    with open(f'{log}.out', 'w') as out, open(f'{log}.err', 'w') as err:
        return subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env or run_env(), stdout=out, stderr=err)


def text(log: Path, stream: str = 'out') -> str:
    return Path(f'{log}.{stream}').read_text(errors='replace')


def wait_until(proc: subprocess.Popen, ready, timeout: float = 240) -> bool:
    """Poll `ready()` every 5 ms until it is true (True) or the process has exited (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError(f'timed out waiting for process {proc.pid}')


def one_error_line(err: str) -> str:
    """The one line a user-fixable error prints (the rest of stderr is progress bars and warnings)."""
    assert 'Traceback' not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(ERROR)]
    assert len(lines) == 1, err[-3000:]
    return lines[0][len(ERROR):]


class Plant:
    """Unpickling this runs code: it writes `marker` (a stand-in for anything an attacker would run)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f'open({self.marker!r}, "w").write("code ran")',)


def rewrite_manifest(ckpt: Path) -> None:
    """What an attacker who plants a file also does: make the manifest match the folder again."""
    files = {p.name: dict(size=p.stat().st_size, sha256=sha256(p))
             for p in sorted(ckpt.iterdir()) if p.name != 'manifest.json'}
    (ckpt / 'manifest.json').write_text(json.dumps(dict(files=files)))


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp('shapes32'), n_train=12, n_val=4, size=32)




# ------------------------------------------------------------------------------------------------------------
# The reference: one uninterrupted run. It is started together with a second run on the same --output (D):
# the one that takes the lock trains, the other stops at once naming it.
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def reference(tmp_path_factory, data) -> dict:
    root = tmp_path_factory.mktemp('reference')
    out = root / 'run'
    procs = [start(train_cmd(*fault_args(data, out)), root / f'launch{i}') for i in range(2)]
    begun = None
    while begun is None and any(p.poll() is None for p in procs):
        if any(CONFIG_LINE in text(root / f'launch{i}') for i in range(2)):
            begun = time.monotonic()
        time.sleep(0.02)
    rcs = [p.wait(timeout=300) for p in procs]
    span = time.monotonic() - (begun or time.monotonic())
    logs = [root / f'launch{i}' for i in range(2)]
    assert sorted(rcs) == [0, 2], [(rc, text(log, 'err')[-3000:]) for rc, log in zip(rcs, logs)]
    winner, loser = (0, 1) if rcs[0] == 0 else (1, 0)
    return dict(out=out, span=span, winner_pid=procs[winner].pid, loser_err=text(logs[loser], 'err'),
                winner_out=text(logs[winner]))


def test_d_a_second_run_on_the_same_output_stops_at_once_naming_the_first(reference):
    line = one_error_line(reference['loser_err'])
    assert line.startswith(f"--output: '{reference['out']}' is in use by another training run "
                           f"(process {reference['winner_pid']} holds "), line
    assert '.lock' in line
    # The run that holds the lock was not disturbed: one config line, all its checkpoints, its final weights.
    assert reference['winner_out'].count(CONFIG_LINE) == 1
    assert sorted(p.name for p in (reference['out'] / 'checkpoints').iterdir()) == [
        'step_00000004', 'step_00000005', 'step_00000006']
    assert [(k, u) for k, u, *_ in metric_trace(reference['out'])] == [
        ('train', 1), ('train', 2), ('train', 3), ('val', 3), ('train', 4), ('train', 5), ('train', 6), ('val', 6)]


def test_d_a_held_lock_stops_the_run_and_a_released_one_does_not(script, capsys, tmp_path, data):
    out = tmp_path / 'run'
    out.mkdir()
    with open(out / '.lock', 'a+') as lock:  # held as a running train_imagenet.py holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(f'{os.getpid()}\n')
        lock.flush()
        assert script.main([str(a) for a in fault_args(data, out, '--resume', tmp_path / 'nowhere')]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f'is in use by another training run (process {os.getpid()} holds' in line
    # Released (the holder ended or was killed): the pid left in the file does not block; the next error is
    # the one after the lock (the --resume folder).
    assert (out / '.lock').read_text().strip() == str(os.getpid())
    assert script.main([str(a) for a in fault_args(data, out, '--resume', tmp_path / 'nowhere')]) == 2
    assert 'nowhere' in one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------------------------
# A and B: what --resume loads. Each test damages a copy of the reference run's checkpoint of update 5.
# The errors come before any data or model is loaded, so main() runs in this process.
# ------------------------------------------------------------------------------------------------------------

def checkpoint_copy(reference, tmp_path) -> tuple:
    out = tmp_path / 'run'
    ckpt = out / 'checkpoints' / 'step_00000005'
    shutil.copytree(reference['out'] / 'checkpoints' / 'step_00000005', ckpt)
    return out, ckpt


def resume_error(script, capsys, data, out, resume, *extra) -> str:
    assert script.main([str(a) for a in fault_args(data, out, '--resume', resume, *extra)]) == 2
    return one_error_line(capsys.readouterr().err)


def test_a_planted_custom_checkpoint_pickle_is_never_unpickled(script, capsys, tmp_path, data, reference):
    marker = tmp_path / 'marker'
    out, ckpt = checkpoint_copy(reference, tmp_path)
    torch.save(Plant(marker), ckpt / 'custom_checkpoint_0.pkl')  # where Accelerate keeps registered objects
    for manifest_too in (False, True):
        if manifest_too:
            rewrite_manifest(ckpt)
        line = resume_error(script, capsys, data, out, ckpt)
        assert line.startswith(f"--resume: '{ckpt / 'custom_checkpoint_0.pkl'}' a pickled custom state"), line
        assert 'could run code' in line
        line = resume_error(script, capsys, data, out, 'latest')
        assert line.startswith('--resume latest: no checkpoint under') and 'custom_checkpoint_0.pkl' in line, line
    assert not marker.exists(), 'resuming ran the code in the planted pickle'


@pytest.mark.parametrize('name', ['optimizer.bin', 'random_states_0.pkl'])
def test_a_planted_accelerate_pickle_is_refused_weights_only(script, capsys, tmp_path, data, reference, name):
    marker = tmp_path / 'marker'
    out, ckpt = checkpoint_copy(reference, tmp_path)
    torch.save(Plant(marker), ckpt / name)
    rewrite_manifest(ckpt)  # so that only the weights-only check stands between the file and Accelerate
    line = resume_error(script, capsys, data, out, ckpt)
    named = re.escape(str(ckpt / name))
    assert re.match(f"--resume: '{named}' holds a pickled reference to (builtins\\.)?exec, ", line), line
    assert 'could run code' in line and UNRESTRICTED not in line
    assert not marker.exists(), 'resuming ran the code in the planted pickle'


def garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())


def truncate(path: Path) -> None:
    size = path.stat().st_size
    with open(path, 'r+b') as f:
        f.truncate(size // 2)


@pytest.mark.parametrize('damage, expected', [
    ('truncated model.safetensors', r"model\.safetensors' (\d+) bytes where the manifest says (\d+) \(truncated or "
                                    r"overwritten\); expected an intact checkpoint"),
    ('garbage optimizer.bin', r"optimizer\.bin' its sha256 differs from the manifest \(damaged or replaced\); "
                              r"expected an intact checkpoint"),
    ('garbage random_states_0.pkl', r"random_states_0\.pkl' its sha256 differs from the manifest \(damaged or "
                                    r"replaced\); pass --resume-without-rng"),
    ('no random_states_0.pkl', r"random_states_0\.pkl' missing \(listed in the manifest\); pass --resume-without-rng"),
    ('no manifest.json', r"manifest\.json' missing: not a checkpoint of this script, or one whose writing did not "
                         r"finish; expected an intact checkpoint"),
])
def test_b_resume_dir_with_a_damaged_file_stops_with_one_line_naming_it(script, capsys, tmp_path, data,
                                                                        reference, damage, expected):
    out, ckpt = checkpoint_copy(reference, tmp_path)
    how, name = damage.split(' ')
    {'truncated': truncate, 'garbage': garbage, 'no': Path.unlink}[how](ckpt / name)
    line = resume_error(script, capsys, data, out, ckpt)
    found = re.match(f"--resume: '{re.escape(str(ckpt))}/{expected}", line)
    assert found, line
    if how == 'truncated':
        assert 2 * int(found.group(1)) == int(found.group(2))


def test_b_an_rng_state_that_cannot_be_restored_is_refused_before_accelerate_skips_it(script, capsys, tmp_path,
                                                                                      data, reference):
    # Accelerate catches any error restoring an RNG state and goes on with a note at info level: these
    # files match their manifest, so only loading them first (weights-only) finds them out.
    out, ckpt = checkpoint_copy(reference, tmp_path)
    garbage(ckpt / 'random_states_0.pkl')
    rewrite_manifest(ckpt)
    line = resume_error(script, capsys, data, out, ckpt)
    assert line.startswith(f"--resume: '{ckpt / 'random_states_0.pkl'}' cannot be unpickled weights-only"), line
    assert UNRESTRICTED not in line and line.endswith('pass --resume-without-rng to continue without it '
                                                              '(not as an uninterrupted run would)')
    torch.save(dict(random_state=(3, (1, 2), None), numpy_random_seed=('MT19937', np.zeros(3, np.uint32), 0, 0, 0.),
                    torch_manual_seed=torch.zeros(7, dtype=torch.uint8)), ckpt / 'random_states_0.pkl')
    rewrite_manifest(ckpt)
    line = resume_error(script, capsys, data, out, ckpt)
    assert "random_states_0.pkl' is not a restorable RNG state (" in line, line


def test_b_resume_without_rng_accepts_a_damaged_rng_state_and_says_so(tmp_path, data, reference):
    marker = tmp_path / 'marker'
    out, ckpt = checkpoint_copy(reference, tmp_path)
    torch.save(Plant(marker), ckpt / 'random_states_0.pkl')  # not in the manifest: damaged; and never run
    proc = run(train_cmd(*fault_args(data, out, '--resume', ckpt, '--resume-without-rng', '--stop-after-steps', 6)))
    assert f"warning: {ckpt / 'random_states_0.pkl'}: " in proc.stdout
    assert 'its RNG state is not restored (--resume-without-rng)' in proc.stdout
    assert 'resumed from' in proc.stdout and (out / 'checkpoints' / 'step_00000006' / 'manifest.json').is_file()
    assert not marker.exists()


def test_b_more_processes_than_wrote_the_checkpoint_is_refused_and_says_what_it_is(tmp_path, data, reference):
    out, ckpt = checkpoint_copy(reference, tmp_path)
    proc = run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', 2, '--master_addr', '127.0.0.1',
                '--master_port', free_port(), SCRIPT, *fault_args(data, out, '--resume', ckpt)],
               env=run_env(ACCELERATE_USE_CPU=1), expect_rc=None)
    assert proc.returncode != 0
    # The same line from both processes. Each is written by the interpreter as it exits (message, then the
    # newline: two writes), so the two may interleave on the shared pipe: split at the prefix, not at newlines.
    lines = {chunk.split('\n')[0] for chunk in proc.stderr.split(ERROR)[1:]}
    assert len(lines) == 1, proc.stderr[-3000:]
    line = lines.pop()
    assert line == (f"--resume: '{ckpt}' was written by 1 process(es) and this run has 2: process(es) 1 have no RNG "
                    'state (random_states_<process>.pkl) to restore for drop path and Mixup, so this run would not '
                    'repeat an uninterrupted one; expected 1 process(es), or --resume-without-rng to continue anyway')


# ------------------------------------------------------------------------------------------------------------
# C: metrics.jsonl after a kill mid-write.
# ------------------------------------------------------------------------------------------------------------

def test_c_a_torn_last_metrics_line_is_dropped_and_a_bad_middle_line_is_named(script, tmp_path):
    path = tmp_path / 'metrics.jsonl'
    rows = [dict(kind='train', epoch=0, update=u, loss=1.0 / u) for u in (1, 2, 3)]
    full = ''.join(json.dumps(r) + '\n' for r in rows)
    path.write_text(full + json.dumps(dict(kind='train', epoch=0, update=4, loss=0.2))[:17])  # killed mid-write
    assert script.MetricsLog.read(path) == rows
    path.write_text(full + '{"kind": "train", "upd\n')  # a torn last line that ends in a newline
    assert script.MetricsLog.read(path) == rows
    lines = full.splitlines(keepends=True)
    path.write_text(lines[0] + '{"kind": "tr\x00\x00\n' + ''.join(lines[1:]))
    with pytest.raises(script.ConfigError, match=r"metrics.jsonl': line 2 of 4 is not a metrics row"):
        script.MetricsLog.read(path)


# ------------------------------------------------------------------------------------------------------------
# G (and B, C, D end to end): kill -9 at random moments, --resume latest after each; every run that gets to
# the end must end bit-identical to the reference. Seeded: the same kill schedule every time.
# ------------------------------------------------------------------------------------------------------------

KILLS = 20


def newest_checkpoint(out: Path) -> int:
    steps = [int(p.name.split('_')[1]) for p in (out / 'checkpoints').glob('step_*')] if out.exists() else []
    return max(steps, default=0)


@pytest.fixture(scope='module')
def kill_loop(tmp_path_factory, data, reference) -> dict:
    """Launch `--resume latest` again and again on one output, killing each launch at a random moment, until
    20 kills; after the 7th and the 14th kill one launch runs to the end, closing a round (checked against the
    reference), and the next round starts from scratch. The moment, drawn from a seeded RNG, is one of
      write    a random instant (0-150 ms) after the run starts writing the checkpoint of a coming update
               (Accelerate's files, the script's own, the manifest, fsync, rename, pruning);
      hook     the test hook, after the manifest and before the rename of that checkpoint;
      step     a random instant within the update after the newest checkpoint (forward, backward, EMA, logging);
      resume   a random instant (0-0.6 s) after the configuration line: loading the checkpoint, rewriting metrics;
      end      with every checkpoint written: validation and export of final/."""
    rng = random.Random(1729)
    root = tmp_path_factory.mktemp('kill_loop')
    per_update = reference['span'] / (UPDATES + 2)  # the reference's time from its configuration line to its exit
    damage_at = {6: 'truncate', 11: 'torn', 16: 'truncate'}  # after these kills (if there is something to damage)
    kills, rounds, events, launches = 0, [], [], 0
    out, pending = root / 'round0' / 'run', None
    # Moments are dealt in shuffled blocks, so that every kind comes up whatever the timing does to the rest.
    deck = [m for block in range(8) for m in rng.sample(['write', 'write', 'step', 'step', 'hook'] + ['resume'] * (
        block % 2), 5 + block % 2)]
    while True:
        env, newest, moment, target, delay = run_env(), newest_checkpoint(out), None, None, None
        if kills < KILLS and not (kills in (7, 14) and len(rounds) < kills // 7):  # after 7, 14 kills: to the end
            if newest >= UPDATES:
                moment, delay = 'end', rng.uniform(0, 2 * per_update)
            else:
                moment = deck.pop(0)
                target = min(newest + rng.choice([1, 2, 2, 3]), UPDATES)
                delay = dict(write=rng.uniform(0, 0.15), step=rng.uniform(0, per_update),
                             resume=rng.uniform(0, 0.6)).get(moment)
        if moment == 'hook':
            env['SPFORMER_TRAIN_TEST_KILL_AT'] = str(target)
        checkpoints = out / 'checkpoints'
        writing = checkpoints / f'.tmp-step_{target or 0:08d}'
        def folder_id():  # (inode, mtime): a new folder can reuse the inode of the stale one it replaces
            with contextlib.suppress(FileNotFoundError):
                return writing.stat().st_ino, writing.stat().st_mtime_ns
        stale = folder_id()  # a temporary folder left by an earlier kill: not this run's write
        log = root / f'launch{launches:02d}'
        launches += 1
        proc = start(train_cmd(*fault_args(data, out, '--resume', 'latest')), log, env)
        ready = {'write': lambda: folder_id() not in (None, stale),
                 'step': lambda: re.search('resumed from|starting from scratch', text(log)) and (
                     target == 1 or (checkpoints / f'step_{target - 1:08d}').exists()),
                 'resume': lambda: CONFIG_LINE in text(log), 'end': lambda: CONFIG_LINE in text(log)}.get(moment)
        lock_holder = None
        if ready is not None and wait_until(proc, ready):
            time.sleep(delay)
            lock_holder = (out / '.lock').read_text().strip()
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
        rc = proc.wait(timeout=300)
        event = dict(log=log, rc=rc, moment=moment, target=target, pid=proc.pid, out=out, stdout=text(log),
                     newest_before=newest, pending=pending, lock_while_running=lock_holder)
        events.append(event)
        pending = None
        if rc == -signal.SIGKILL:
            kills += 1
            event['lock_after_kill'] = (out / '.lock').read_text().strip()
            what = damage_at.get(kills)
            complete = sorted(checkpoints.glob('step_*')) if out.exists() else []
            if what == 'truncate' and len(complete) >= 2:
                truncate(complete[-1] / 'model.safetensors')
                pending = ('truncated', complete[-1].name)
            elif what == 'torn' and (out / 'metrics.jsonl').exists():
                with open(out / 'metrics.jsonl', 'a') as f:
                    f.write('{"kind": "train", "epoch": 1, "upd')
                pending = ('torn', None)
            elif what:
                damage_at[kills + 1] = what  # nothing to damage yet: after the next kill
            continue
        assert rc == 0, f'{log}: exit {rc}\n{text(log)[-3000:]}\n{text(log, "err")[-5000:]}'
        rounds.append(out)
        if kills >= KILLS:
            break
        out = root / f'round{len(rounds)}' / 'run'
    return dict(kills=kills, rounds=rounds, events=events)


def test_g_kill_9_at_random_moments_then_resume_latest_ends_bit_identical(kill_loop, reference):
    assert kill_loop['kills'] == KILLS
    killed = [e for e in kill_loop['events'] if e['rc'] == -signal.SIGKILL]
    moments = {m: sum(e['moment'] == m for e in killed) for m in ('write', 'hook', 'step', 'resume', 'end')}
    assert moments['write'] >= 4 and moments['hook'] >= 2 and moments['step'] >= 4 and moments['resume'], moments
    assert len({e['newest_before'] for e in killed}) >= 4  # before the first checkpoint, between them, at the end
    assert len(kill_loop['rounds']) >= 3
    expected, trace = final_digests(reference['out']), metric_trace(reference['out'])
    for out in kill_loop['rounds']:
        assert final_digests(out) == expected, f'{out}: the final weights differ from the uninterrupted run'
        assert metric_trace(out) == trace, f'{out}: the metrics differ from the uninterrupted run'


def test_g_a_truncated_latest_checkpoint_resumes_from_the_one_before(kill_loop):
    # The run after the damage said what it skipped; the round it belongs to still ended bit-identical (above).
    damaged = [e for e in kill_loop['events'] if e['pending'] and e['pending'][0] == 'truncated']
    assert damaged, 'no checkpoint was truncated'
    for event in damaged:
        name = event['pending'][1]
        assert re.search(rf'--resume latest: skipping {name}: model\.safetensors: \d+ bytes where the manifest says '
                         r'\d+ \(truncated or overwritten\)', event['stdout']), event['stdout'][-2000:]
        if 'resumed from' in event['stdout']:
            assert f'resumed from {event["out"] / "checkpoints" / name}' not in event['stdout']


def test_c_a_torn_metrics_line_left_by_a_kill_does_not_stop_the_resume(kill_loop):
    torn = [e for e in kill_loop['events'] if e['pending'] and e['pending'][0] == 'torn']
    assert torn and all(e['rc'] in (0, -signal.SIGKILL) for e in torn)
    assert not any('is not a metrics row' in text(e['log'], 'err') for e in torn)


def test_d_the_lock_of_a_killed_run_does_not_block_the_next(kill_loop):
    killed = [e for e in kill_loop['events'] if e['lock_while_running'] and e['rc'] == -signal.SIGKILL]
    assert killed and all(e['lock_while_running'] == str(e['pid']) for e in killed)  # it held the lock
    # ... and the pid stays in the file after the kill, yet the next launch went on (no 'in use' error).
    assert all(e['lock_after_kill'] == str(e['pid']) for e in killed)
    assert not [e for e in kill_loop['events'] if 'is in use by another training run' in text(e['log'], 'err')]


# ------------------------------------------------------------------------------------------------------------
# E: unreadable images. A copy of the data with a truncated PNG, a file of random bytes, an empty file and a
# dangling symbolic link among the training images (and an empty file among the validation images), plus a
# 16-bit PNG that is fine.
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def bad_data(tmp_path_factory, data) -> dict:
    root = tmp_path_factory.mktemp('bad_images') / 'data'
    shutil.copytree(data, root)
    train, val = root / 'train', root / 'val'
    good = (train / 'red_circle' / '000.png').read_bytes()
    bad = {train / 'red_circle' / 'zz_truncated.png': good[:len(good) // 2],
           train / 'green_square' / 'zz_random_bytes.jpg': bytes(np.random.default_rng(1).integers(0, 256, 900,
                                                                                                   dtype=np.uint8)),
           train / 'blue_triangle' / 'zz_empty.png': b'',
           val / 'yellow_bar' / 'zz_empty.png': b''}
    for path, content in bad.items():
        path.write_bytes(content)
    (train / 'yellow_bar' / 'zz_dangling.png').symlink_to(root / 'nowhere.png')
    bad[train / 'yellow_bar' / 'zz_dangling.png'] = None
    ramp = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60)  # 16-bit grey: 0 .. 61380
    Image.fromarray(ramp).save(train / 'red_circle' / 'zz_16bit.png')
    return dict(root=root, bad=sorted(str(p) for p in bad))


@pytest.fixture(scope='module')
def bad_runs(tmp_path_factory, bad_data) -> dict:
    root = tmp_path_factory.mktemp('bad_runs')
    data = bad_data['root']
    runs = {}
    # Without --skip-bad-images the first unreadable image stops the run; read in a loader worker process.
    runs['stopped'] = run(train_cmd(*fault_args(data, root / 'stopped', '--workers', 1)), expect_rc=2)
    # With it: two loader workers (new ones every epoch), each bad file still reported once.
    runs['skipping'] = run(train_cmd(*fault_args(data, root / 'skipping', '--skip-bad-images', '--workers', 2)))
    # And resumable exactly: stopped after 2 updates, resumed to the end.
    runs['first_half'] = run(train_cmd(*fault_args(data, root / 'resumed', '--skip-bad-images',
                                                   '--stop-after-steps', 2)))
    runs['second_half'] = run(train_cmd(*fault_args(data, root / 'resumed', '--skip-bad-images', '--resume',
                                                    'latest')))
    return dict(root=root, **runs)


def test_e_an_unreadable_image_stops_the_run_with_one_line_naming_it(bad_runs, bad_data):
    line = one_error_line(bad_runs['stopped'].stderr)
    named = re.match(r"cannot read image '([^']+)': (.+); expected a readable image .* or --skip-bad-images", line)
    assert named and named.group(1) in bad_data['bad'], line
    assert not (bad_runs['root'] / 'stopped' / 'checkpoints').exists()


def test_e_skip_bad_images_replaces_each_once_lists_it_and_resumes_exactly(bad_runs, bad_data):
    out = bad_runs['root'] / 'skipping'
    listed = (out / 'skipped_images.txt').read_text().splitlines()
    assert sorted(re.match(r"cannot read image '([^']+)': ", line).group(1) for line in listed) == bad_data['bad']
    # On stderr too, each once in 2 epochs x 2 loader workers (a line may follow a progress bar's text).
    reported = re.findall(r'--skip-bad-images: replaced by the next readable sample: ([^\r\n]*)',
                          bad_runs['skipping'].stderr)
    assert sorted(reported) == sorted(listed)
    reasons = '\n'.join(listed)
    for reason in ('truncated', 'the file is empty (0 bytes)', 'not an image', 'dangling symbolic link'):
        assert reason in reasons, reasons
    assert '16bit' not in reasons
    resumed = bad_runs['root'] / 'resumed'
    assert 'resumed from' in bad_runs['second_half'].stdout
    assert final_digests(resumed) == final_digests(out)
    assert metric_trace(resumed) == metric_trace(out)
    assert sorted((resumed / 'skipped_images.txt').read_text().splitlines()) == sorted(listed)


def test_e_hugging_face_images_go_through_to_rgb(script, tmp_path):
    # A 16-bit grey image (as datasets decodes a 16-bit PNG): scaled to 8 bits, not clipped to white.
    image = Image.fromarray(np.full((4, 4), 40000, np.uint16))
    rows = [dict(image=image, label=3)]
    rgb, label = script.hf_sample(rows, 'image', 'label', "--hf-dataset 'x' split 'train'", 0)
    assert rgb.mode == 'RGB' and label == 3 and np.asarray(rgb).max() == round(40000 * 255 / 65535)

    class Damaged:
        def __getitem__(self, index):
            raise OSError('image file is truncated (3 bytes not processed)')
    with pytest.raises(script.ImageReadError, match=r"row 7 of --hf-dataset 'x' split 'train': OSError: image file "
                                                    r'is truncated'):
        script.hf_sample(Damaged(), 'image', 'label', "--hf-dataset 'x' split 'train'", 7)


def test_e_a_bad_sample_is_replaced_by_the_next_readable_one(script, tmp_path):
    def get(index):
        if index in (1, 2, 5):
            raise script.ImageReadError(f"cannot read image 'img{index}.png': the file is empty (0 bytes)")
        return Image.new('RGB', (2, 2), (index, 0, 0)), index
    skipped = script.SkippedImages(tmp_path / 'skipped_images.txt')
    dataset = script.TransformedDataset(get, 6, lambda im: im.getpixel((0, 0))[0], 0, skipped)
    assert [dataset[(0, i)]['label'] for i in range(6)] == [0, 3, 3, 3, 4, 0]  # 5 wraps around to 0
    assert [dataset[(0, i)]['image'] for i in range(6)] == [0, 3, 3, 3, 4, 0]
    assert len((tmp_path / 'skipped_images.txt').read_text().splitlines()) == 3
    with pytest.raises(script.ImageReadError, match='img1.png'):
        script.TransformedDataset(get, 6, lambda im: im, 0)[(0, 1)]


# ------------------------------------------------------------------------------------------------------------
# F: YAML values go through the same parser as the flags.
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('line, expected', [
    ('model-ema: "false"', 'model-ema: "false" is not a boolean; expected true or false (unquoted)'),
    ('no_plot: "yes"', 'no_plot: "yes" is not a boolean'),
    ('epochs: 2.5', 'epochs: 2.5 is not an integer'),
    ('epochs: [2, 3]', 'epochs: [2, 3] is a list; expected a single value'),
    ('lr_base: true', 'lr_base: true is a boolean; expected a number'),
    ('mixup: null', 'mixup: null is null; expected a value (the default is 0.8)'),
    ('mixup: fast', 'mixup: "fast" is not a number'),
    ('attn-backend: fused', 'attn-backend: "fused" is not one of'),
    ('mixup_mode: row', 'mixup_mode: "row" is not one of'),
    ('scale: 0.5', 'scale: 0.5 is not a list of 2 values'),
    ('opt_betas: [0.9, null]', 'opt_betas: [0.9, null] holds a value that is not a number'),
])
def test_f_yaml_values_are_checked_like_flags_and_named(script, tmp_path, line, expected):
    cfg = tmp_path / 'x.yaml'
    cfg.write_text(line + '\n')
    with pytest.raises(script.ConfigError) as error:
        script.parse_args(['--config', str(cfg), '--data-dir', 'x'])
    assert str(error.value).startswith(f'--config {cfg}: {expected}'), str(error.value)
    assert '\n' not in str(error.value)


def test_f_yaml_booleans_lists_and_nulls_parse_as_their_flags(script, tmp_path):
    cfg = tmp_path / 'x.yaml'
    cfg.write_text('model-ema: false\nmodel_ema_warmup: true\nno-plot: true\ncompile: false\nscale: [0.5, 1]\n'
                   'lr: null\nlr_base: 5e-4\nepochs: 7\nattn-backend: cpu\nconfig: ignored.yaml\n')
    args = script.parse_args(['--config', str(cfg), '--data-dir', 'x'])
    assert (args.model_ema, args.model_ema_warmup, args.no_plot, args.compile) == (False, True, True, False)
    assert (args.scale, args.lr, args.lr_base, args.epochs, args.attn_backend) == ([0.5, 1.0], None, 5e-4, 7, 'cpu')
    # Flags on the command line still win, booleans included.
    args = script.parse_args(['--config', str(cfg), '--data-dir', 'x', '--model-ema', '--epochs', '3'])
    assert (args.model_ema, args.epochs) == (True, 3)
    # The effective configuration a run writes is a valid --config (every default spelled out).
    written = tmp_path / 'train_config.yaml'
    written.write_text(yaml.safe_dump(vars(script.parse_args(['--data-dir', 'x', '--no-model-ema'])), sort_keys=False))
    again = script.parse_args(['--config', str(written)])
    assert again.model_ema is False and again.data_dir == 'x' and again.scale == [0.08, 1.0]


def test_f_a_bad_yaml_value_is_a_one_line_error_of_the_script(script, capsys, tmp_path):
    cfg = tmp_path / 'x.yaml'
    cfg.write_text('epochs: 2.5\n')
    assert script.main(['--config', str(cfg), '--data-dir', str(tmp_path)]) == 2
    assert one_error_line(capsys.readouterr().err) == f'--config {cfg}: epochs: 2.5 is not an integer'


# ------------------------------------------------------------------------------------------------------------
# H, I: no unrestricted unpickling anywhere; SPFORMER_DEBUG shows the traceback.
# ------------------------------------------------------------------------------------------------------------

def python_files():
    for folder, subfolders, files in os.walk(ROOT):
        here = Path(folder)
        subfolders[:] = sorted(d for d in subfolders if not (here == ROOT and (d.startswith('.') or d in (
            'build', 'dist')) or here / d == ROOT / 'tests' / 'timm_suite'))
        yield from (here / name for name in sorted(files) if name.endswith('.py'))


def test_h_no_code_path_loads_a_pickle_without_the_weights_only_restriction():
    files = list(python_files())
    assert ROOT / 'train_imagenet.py' in files and len(files) > 20
    offenders = []
    banned = re.compile(r'\bpickle\.loads?\(|\bUnpickler\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False|'
                        + 'load_custom' + '_state')  # Accelerate's loader of registered objects: unrestricted
    for path in files:
        source = path.read_text()
        for number, line in enumerate(source.splitlines(), 1):
            # (a round trip of an object pickled on the spot, as a test of picklability does, loads no file)
            if banned.search(line.replace('pickle.loads(pickle.dumps(', '')):
                offenders.append(f'{path.relative_to(ROOT)}:{number}: {line.strip()}')
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == 'load' \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == 'torch':
                if not any(k.arg == 'weights_only' and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords):
                    offenders.append(f'{path.relative_to(ROOT)}:{node.lineno}: torch.load without weights_only=True')
    assert not offenders, '\n'.join(offenders)
    # And the training script registers nothing with Accelerate (which would pickle it and unpickle it freely).
    assert 'register_for_checkpointing(' not in (ROOT / 'train_imagenet.py').read_text()


def test_i_spformer_debug_shows_the_traceback(script, capsys, monkeypatch, tmp_path):
    argv = ['--data-dir', str(tmp_path / 'missing'), '--output', str(tmp_path / 'out')]
    monkeypatch.delenv('SPFORMER_DEBUG', raising=False)
    assert script.main(argv) == 2
    assert capsys.readouterr().err.startswith(f"{ERROR}--data-dir: '{tmp_path / 'missing'}' does not exist")
    monkeypatch.setenv('SPFORMER_DEBUG', '1')
    with pytest.raises(script.ConfigError, match='--data-dir'):
        script.main(argv)


def test_randaugment_posterize_to_zero_bits_gives_black_instead_of_stopping_the_run(script):
    # Found by the runs above: timm's RandAugment (the default 'rand-m9-mstd0.5-inc1') asks for 0 bits in
    # about 1 image of 700, which Pillow >= 11 refuses; the script makes it black, as 0 bits always meant.
    from timm.data.auto_augment import AugmentOp
    script.posterize_zero_bits_as_black()
    op = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10, hparams=dict(magnitude_std=0))
    image = Image.new('RGB', (8, 8), (200, 120, 40))
    assert np.asarray(op(image)).max() == 0
    op = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=5, hparams=dict(magnitude_std=0))
    assert np.asarray(op(image)).tolist() == np.asarray(image.point(lambda v: v & 0b11000000)).tolist()
