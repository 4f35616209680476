"""Checkpoints of a training run and the lock on its output folder.

A checkpoint is Accelerate's state (model, optimizer, scaler with fp16, one RNG state per process) plus the
run's own (:class:`TrainState` and the lr schedule as JSON, the EMA weights as safetensors) plus a manifest
(size and sha256 of every file), written last into ``checkpoints/.tmp-step_N``, fsynced and renamed to
``checkpoints/step_N``: a crash mid-write leaves only a temporary folder, which ``--resume latest`` ignores.

Nothing read back can run code: the run's own state loads without unpickling, and Accelerate's pickled files
are each loaded weights-only (tensors, numbers, numpy arrays) and checked before Accelerate loads them; a
checkpoint holding anything else, or whose files do not match its manifest, is refused, naming the file.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from timm.utils import ModelEmaV3

from spformer.training.config import ConfigError


class TrainState:
    """Position in training: epoch, batches consumed in it (per process) and optimizer updates so far, and
    the settings that give those numbers their meaning (`layout`)."""

    def __init__(self, layout: Dict[str, Any]):
        self.epoch = 0
        self.batch_in_epoch = 0
        self.update = 0
        self.layout = dict(layout)
        self.saved_layout = dict(layout)

    def state_dict(self) -> Dict[str, Any]:
        return dict(epoch=self.epoch, batch_in_epoch=self.batch_in_epoch, update=self.update, layout=self.layout)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        position = [state['epoch'], state['batch_in_epoch'], state['update']]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in position):
            raise ValueError(f'epoch, batch_in_epoch and update are {position}; expected integers >= 0')
        self.epoch, self.batch_in_epoch, self.update = position
        self.saved_layout = dict(state.get('layout', {}))

    def layout_changes(self) -> List[str]:
        return [f'{k} {self.saved_layout.get(k)} -> {v}' for k, v in self.layout.items() if self.saved_layout.get(k) != v]


CHECKPOINT_RE = re.compile(r'^step_(\d+)$')
MANIFEST = 'manifest.json'  # {"files": {name: {"size": bytes, "sha256": hex}}}, written last
TRAINING_STATE = 'training_state.json'  # TrainState and the lr scheduler
EMA_WEIGHTS = 'model_ema.safetensors'
RNG_STATE_RE = re.compile(r'^random_states_(\d+)\.pkl$')  # Accelerate's, one per process
PICKLED_SUFFIXES = ('.pkl', '.bin', '.pt', '.pth')  # what Accelerate writes with torch.save


def list_checkpoints(root: Path) -> List[Path]:
    """Checkpoint folders under root, oldest first (temporary folders of unfinished writes are not listed;
    whether a listed one is intact is checkpoint_problems')."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def fsync_tree(path: Path) -> None:
    for folder, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def checkpoint_files(folder: Path) -> List[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob('*') if p.is_file() or p.is_symlink())


def write_training_state(folder: Path, state: TrainState, scheduler, model_ema: Optional[ModelEmaV3]) -> None:
    """What this script adds to Accelerate's state, in formats that load without running code: the position
    in the data and the lr schedule as JSON (floats round-trip exactly), the EMA weights as safetensors.
    (Objects registered with Accelerate would be pickled, and Accelerate unpickles them unrestricted.)"""
    import safetensors.torch
    (folder / TRAINING_STATE).write_text(json.dumps(
        dict(train_state=state.state_dict(), lr_scheduler=scheduler.state_dict()), indent=1) + '\n')
    if model_ema is not None:
        safetensors.torch.save_model(model_ema.module, str(folder / EMA_WEIGHTS), metadata={'format': 'pt'})


def load_training_state(folder: Path, state: TrainState, scheduler, model_ema: Optional[ModelEmaV3],
                        device) -> None:
    import safetensors.torch
    where = f'--resume: {str(folder)!r}'
    try:
        saved = json.loads((folder / TRAINING_STATE).read_text())
        state.load_state_dict(saved['train_state'])
        schedule = dict(saved['lr_scheduler'])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f'{where}: {TRAINING_STATE} is unreadable ({type(e).__name__}: {e}); expected the one '
                          'this script writes') from e
    if set(schedule) != set(scheduler.state_dict()):
        raise ConfigError(f'{where}: the lr schedule in {TRAINING_STATE} is not a {type(scheduler).__name__}\'s; '
                          'expected the flags of the run that wrote it (the same --sched)')
    scheduler.load_state_dict(schedule)
    has_ema = (folder / EMA_WEIGHTS).is_file()
    if has_ema != (model_ema is not None):
        raise ConfigError(f'{where} was written {"with" if has_ema else "without"} an EMA of the weights; expected '
                          f'the flags of the run that wrote it ({"--model-ema" if has_ema else "--no-model-ema"})')
    if model_ema is not None:
        try:
            safetensors.torch.load_model(model_ema.module, str(folder / EMA_WEIGHTS), strict=True, device=str(device))
        except RuntimeError as e:
            raise ConfigError(f'{where}: {EMA_WEIGHTS} does not fit this model ({" ".join(str(e).split())[:300]}); '
                              'expected the flags of the run that wrote it') from e


def save_checkpoint(accelerator, root: Path, update: int, keep: int, config_text: str, state: TrainState,
                    scheduler, model_ema: Optional[ModelEmaV3]) -> Path:
    """Atomically write checkpoints/step_<update>; keep the newest `keep` (0: all). Called by every process."""
    final = root / f'step_{update:08d}'
    tmp = root / f'.tmp-step_{update:08d}'
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob('.tmp-*'):  # left by a run that died while writing
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every process writes its RNG state here (a shared filesystem)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_training_state(tmp, state, scheduler, model_ema)
        (tmp / 'train_config.yaml').write_text(config_text)
        # Last: size and sha256 of every file. A folder whose files match it was written completely, and a
        # file damaged or replaced later is named on resume instead of failing inside a loader (or, for an
        # RNG state, being skipped by Accelerate without a word).
        files = {name: dict(size=(tmp / name).stat().st_size, sha256=file_sha256(tmp / name))
                 for name in checkpoint_files(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(dict(files=files), indent=1) + '\n')
        if os.environ.get('SPFORMER_TRAIN_TEST_KILL_AT') == str(update):  # test hook: die mid-write
            os.kill(os.getpid(), signal.SIGKILL)
        fsync_tree(tmp)
        if final.exists():  # a run resumed from an older checkpoint reached this update again
            old = root / f'.tmp-old-step_{update:08d}'
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        fsync_tree_dir = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fsync_tree_dir)
        finally:
            os.close(fsync_tree_dir)
        if keep:
            for old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def checkpoint_problems(folder: Path) -> List[Tuple[str, str]]:
    """What is wrong with a checkpoint folder, as (file, why) pairs, worst first; [] when every file matches
    the manifest and every pickled file is plain data that Accelerate will restore. Pickled files are read
    weights-only (tensors, numbers, numpy arrays): one that holds anything else is reported, never run."""
    planted = sorted(p.name for p in folder.glob('custom_checkpoint_*.pkl'))
    if planted:
        return [(planted[0], 'a pickled custom state, which this script neither writes nor loads (unpickling it '
                             'could run code): the checkpoint was written by an older train_imagenet.py, or the '
                             'file was planted')]
    try:
        files = json.loads((folder / MANIFEST).read_text())['files']
        if not all(isinstance(e, dict) and isinstance(e.get('size'), int) and isinstance(e.get('sha256'), str)
                   for e in files.values()):
            raise ValueError('an entry without size and sha256')
    except FileNotFoundError:
        return [(MANIFEST, 'missing: not a checkpoint of this script, or one whose writing did not finish')]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return [(MANIFEST, f'unreadable ({type(e).__name__}: {e})')]
    problems = []
    for name, entry in files.items():
        path = folder / name
        if Path(name).is_absolute() or '..' in Path(name).parts:
            problems.append((name, 'names a file outside the checkpoint folder'))
        elif not path.is_file():
            problems.append((name, 'missing (listed in the manifest)'))
        elif path.stat().st_size != entry['size']:
            problems.append((name, f'{path.stat().st_size} bytes where the manifest says {entry["size"]} '
                                   '(truncated or overwritten)'))
        elif file_sha256(path) != entry['sha256']:
            problems.append((name, 'its sha256 differs from the manifest (damaged or replaced)'))
        elif name.endswith(PICKLED_SUFFIXES):
            problem = pickled_file_problem(path)
            if problem:
                problems.append((name, problem))
    problems += [(name, 'not in the manifest (added after the checkpoint was written)')
                 for name in checkpoint_files(folder) if name != MANIFEST and name not in files]
    return problems


def pickled_file_problem(path: Path) -> Optional[str]:
    """Why one of Accelerate's torch.save files cannot be restored, or None. Accelerate loads them weights-only
    too, but a refused file then fails with advice to unpickle it unrestricted, and an RNG state that cannot
    be restored is passed over with a note at info level: so each is loaded here first, weights-only."""
    from accelerate.utils import load
    try:  # memory-mapped when it can be: the optimizer state is twice the model
        loaded = load(path, map_location='cpu', weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:  # (its text advises unrestricted unpickling: never here)
        named = re.search(r'GLOBAL ([\w.]+)', str(e))
        if named:
            return (f'holds a pickled reference to {named.group(1)}, not only tensors, numbers and arrays: refused, '
                    'since unpickling it could run code')
        detail = re.search(r'WeightsUnpickler error:\s*([^\n]+)', str(e))
        return (f'cannot be unpickled weights-only ({detail.group(1).strip() if detail else "refused"}): damaged, '
                'or holding objects other than tensors, numbers and arrays, which are refused since unpickling '
                'them could run code')
    except Exception as e:
        return f'cannot be read ({type(e).__name__}: {" ".join(str(e).split())[:200]})'
    if RNG_STATE_RE.match(path.name):
        try:  # into private generators: the process-wide ones are restored by Accelerate
            random.Random().setstate(loaded['random_state'])
            np.random.RandomState().set_state(loaded['numpy_random_seed'])
            torch.Generator().set_state(loaded['torch_manual_seed'])
        except Exception as e:
            return f'is not a restorable RNG state ({type(e).__name__}: {" ".join(str(e).split())[:200]})'
    return None


def is_rng_problem(problem: Tuple[str, str]) -> bool:
    return RNG_STATE_RE.match(problem[0]) is not None


def resolve_resume(args, output: Path) -> Tuple[Optional[Path], List[str]]:
    """The checkpoint to resume from (None: --resume latest found none) and notes to print: for 'latest', the
    newer checkpoints passed over and why; with --resume-without-rng, the RNG states it will not restore."""
    def blocking(problems):
        return [p for p in problems if not (args.resume_without_rng and is_rng_problem(p))]

    def rng_notes(path, problems):
        return [f'warning: {path / name}: {why}; its RNG state is not restored (--resume-without-rng), so this '
                'run will not repeat an uninterrupted one exactly' for name, why in problems if RNG_STATE_RE.match(name)]

    if args.resume == 'latest':
        root, skipped = output / 'checkpoints', []
        for path in reversed(list_checkpoints(root)):
            problems = checkpoint_problems(path)
            if not blocking(problems):
                return path, skipped + rng_notes(path, problems)
            name, why = blocking(problems)[0]
            skipped.append(f'--resume latest: skipping {path.name}: {name}: {why}')
        if skipped:
            raise ConfigError(f'--resume latest: no checkpoint under {str(root)!r} is intact ('
                              + '; '.join(s.split(': ', 1)[1] for s in skipped) + '); expected at least one whose '
                              'files match its manifest, or a new --output to start over')
        return None, []
    path = Path(args.resume)
    if not path.is_dir():
        raise ConfigError(f'--resume: {args.resume!r} is not a checkpoint folder; expected a checkpoints/step_N '
                          "folder written by this script, or 'latest'")
    problems = checkpoint_problems(path)
    if blocking(problems):
        name, why = blocking(problems)[0]
        hint = ('pass --resume-without-rng to continue without it (not as an uninterrupted run would)'
                if is_rng_problem((name, why)) else
                "expected an intact checkpoint ('--resume latest' takes the newest one that is)")
        raise ConfigError(f'--resume: {str(path / name)!r} {why}; {hint}')
    return path, rng_notes(path, problems)


def check_rng_states(folder: Path, num_processes: int, without_rng: bool, accelerator) -> None:
    """Every process of this run needs the RNG state of its own process in the checkpoint (Accelerate restarts
    the RNG of one that has none, with only a warning about "fewer processes")."""
    writers = {int(m.group(1)) for p in folder.iterdir() if (m := RNG_STATE_RE.match(p.name))}
    missing = [i for i in range(num_processes) if i not in writers]
    if not missing:
        return
    what = (f'{str(folder)!r} was written by {len(writers)} process(es) and this run has {num_processes}: '
            f'process(es) {", ".join(map(str, missing))} have no RNG state (random_states_<process>.pkl) to restore '
            'for drop path and Mixup')
    if not without_rng:
        raise ConfigError(f'--resume: {what}, so this run would not repeat an uninterrupted one; expected '
                          f'{len(writers)} process(es), or --resume-without-rng to continue anyway')
    accelerator.print(f'warning: {what}; they start from --seed instead (--resume-without-rng)')


def checkpoint_to_resume(args, output: Path, accelerator) -> Optional[Path]:
    """The checkpoint that --resume names, checked before anything is loaded from it (resolve_resume,
    check_rng_states), or None for a fresh start, which an output folder holding checkpoints refuses."""
    resume_from, resume_notes = resolve_resume(args, output) if args.resume else (None, [])
    for note in resume_notes:
        accelerator.print(note)
    if resume_from is not None:
        check_rng_states(resume_from, accelerator.num_processes, args.resume_without_rng, accelerator)
    elif list_checkpoints(output / 'checkpoints'):
        raise ConfigError(f'--output: {str(output)!r} already holds checkpoints of an earlier run; expected '
                          '--resume latest to continue it, or a new --output')
    return resume_from


def load_checkpoint(accelerator, folder: Path, state: TrainState, scheduler,
                    model_ema: Optional[ModelEmaV3]) -> None:
    """Resume from `folder` (checked by checkpoint_to_resume): Accelerate's files (weights, optimizer, scaler,
    RNG states, unpickled weights-only), then the scheduler, EMA and the position in the data."""
    try:
        accelerator.load_state(str(folder))
    except RuntimeError as e:
        raise ConfigError(f'--resume: {str(folder)!r} does not match this configuration '
                          f'({" ".join(str(e).split())[:300]}); expected the flags of the run that wrote it') from e
    load_training_state(folder, state, scheduler, model_ema, accelerator.device)
    accelerator.print(f'resumed from {folder}: epoch {state.epoch}, batch {state.batch_in_epoch}, '
                      f'update {state.update}')
    if state.layout_changes():
        accelerator.print(f'warning: resuming with changed settings ({", ".join(state.layout_changes())}): '
                          'training continues from the saved state but will not repeat an uninterrupted run')


# ----------------------------------------------------------------------------------------------------------
# The output folder: one run at a time.
# ----------------------------------------------------------------------------------------------------------

def claim_output(accelerator, output: Path, resources: contextlib.ExitStack) -> None:
    """Make `output` this run's until it ends: the main process holds its lock (lock_output) and every
    process stops with a ConfigError if another run holds it."""
    holder = lock_output(output, resources) if accelerator.is_main_process else None
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast
        code = -1 if holder is None else int(holder) if holder.isdigit() else 0
        code = int(broadcast(torch.tensor([code], device=accelerator.device)).item())
        holder = None if code == -1 else str(code or 'unknown')
    if holder is not None:
        raise ConfigError(f'--output: {str(output)!r} is in use by another training run (process {holder} holds '
                          f'{str(output / ".lock")!r}); expected a different --output, or that run to end first')


def lock_output(output: Path, resources: contextlib.ExitStack) -> Optional[str]:
    """Hold <output>/.lock (flock) until the run ends, so that a second run on the same --output stops at once
    instead of interleaving its checkpoints and metrics with this one's. The kernel drops the lock when the
    process dies, so a run killed without cleanup never blocks the next one. Returns None, or the pid that
    the holder wrote into the file."""
    output.mkdir(parents=True, exist_ok=True)
    lock = resources.enter_context(open(output / '.lock', 'a+'))
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        # The holder writes its pid just after taking the lock, over the pid of the run before (dead): poll
        # for a second until the file names a live process (one on another machine is never seen alive).
        holder = ''
        for _ in range(100):
            lock.seek(0)
            holder = lock.read().strip()
            if holder.isdigit() and process_alive(int(holder)):
                break
            time.sleep(0.01)
        return holder or 'unknown'
    lock.truncate(0)
    lock.write(f'{os.getpid()}\n')
    lock.flush()
    return None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def resume_run(accelerator, args, output: Path, resume_from: Optional[Path], state: TrainState, scheduler,
               model_ema: Optional[ModelEmaV3] = None) -> None:
    """Seed every process's own draws (drop path, Mixup), then load the checkpoint to resume from, if any:
    Accelerate's files (checked by checkpoint_to_resume, unpickled weights-only), then the scheduler, the EMA
    and the position in the data."""
    from accelerate.utils import set_seed
    set_seed(args.seed, device_specific=True)
    if args.resume and resume_from is None:
        accelerator.print(f'--resume latest: no checkpoint under {output / "checkpoints"}, starting from scratch')
    if resume_from is not None:
        load_checkpoint(accelerator, resume_from, state, scheduler, model_ema)
