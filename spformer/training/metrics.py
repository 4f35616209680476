"""Validation and the record of a run: top-1/top-5/loss over the whole validation set, metrics.jsonl (and
Accelerate's trackers), and training_curves.png drawn from it (matplotlib is imported only to draw)."""
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.utils import ModelEmaV3

from spformer.training.config import ConfigError
from spformer.training.rng import rng_isolated


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator, num_classes: int) -> Dict[str, float]:
    """Top-1 (percent), loss and, with more than 5 classes, top-5 over the whole validation set, gathered
    across processes. With 5 classes or fewer top-5 would count every prediction as a hit: it is left out."""
    model.eval()
    k = min(5, num_classes)
    correct1 = correct5 = loss_sum = count = 0.
    for batch in rng_isolated(loader):
        with accelerator.autocast():
            logits = model(batch['image'])
        losses = nn.functional.cross_entropy(logits.float(), batch['label'], reduction='none')
        topk = logits.topk(k, dim=1).indices
        topk, labels, losses = accelerator.gather_for_metrics((topk, batch['label'], losses))
        hits = topk == labels[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        loss_sum += losses.sum().item()
        count += labels.numel()
    results = dict(top1=100. * correct1 / count)
    if num_classes > 5:
        results['top5'] = 100. * correct5 / count
    return dict(results, loss=loss_sum / count, samples=int(count))


def validate(model: nn.Module, model_ema: Optional[ModelEmaV3], loader, accelerator,
             num_classes: int) -> Dict[str, float]:
    """evaluate of the weights and, with an EMA, of the EMA weights too (its keys suffixed ``_ema``)."""
    results = evaluate(model, loader, accelerator, num_classes)
    if model_ema is not None:
        ema_results = evaluate(model_ema.module, loader, accelerator, num_classes)
        results.update({f'{k}_ema': v for k, v in ema_results.items() if k != 'samples'})
    return results


class MetricsLog:
    """metrics.jsonl on the main process, plus the Accelerate trackers (if any)."""

    def __init__(self, accelerator, path: Path, resume_update: Optional[int]):
        self.accelerator, self.path = accelerator, path
        if accelerator.is_main_process and resume_update is not None and path.exists():
            # Rows logged after the checkpoint we resume from belong to a run that did not survive (and so
            # may a torn last line). Replaced atomically: a kill now must not lose the rows before it.
            rows = [r for r in self.read(path) if r['update'] <= resume_update]
            tmp = path.with_name(path.name + '.tmp')
            with tmp.open('w') as f:
                f.write(''.join(json.dumps(r) + '\n' for r in rows))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

    def log(self, row: Dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with self.path.open('a') as f:
                f.write(json.dumps(row) + '\n')
        values = {f'{row["kind"]}/{k}': v for k, v in row.items() if isinstance(v, (int, float)) and k != 'update'}
        self.accelerator.log(values, step=row['update'])

    @staticmethod
    def read(path: Path) -> List[Dict[str, Any]]:
        """The rows of a metrics.jsonl. A last line that does not parse is a row torn by a kill mid-write: it is
        dropped. A bad line before it is damage that dropping would hide: a ConfigError names it."""
        lines = path.read_text(errors='replace').splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        rows = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get('update'), int) or 'kind' not in row:
                    raise ValueError('not a row with "kind" and "update"')
            except ValueError as e:
                if number == len(lines):
                    break
                raise ConfigError(f'{str(path)!r}: line {number} of {len(lines)} is not a metrics row ({e}): '
                                  f'{line[:80]!r}; expected one JSON row per line (repair or remove that line)') from e
            rows.append(row)
        return rows


def accuracy_text(results: Dict[str, Any], suffix: str = '') -> str:
    """'top-1 T1  top-5 T5' of validation results (top-5 only where evaluate reports it)."""
    return '  '.join(f'top-{k} {results[f"top{k}{suffix}"]:.2f}' for k in (1, 5) if f'top{k}{suffix}' in results)


ACCURACY_CURVES = (('top1', 'top-1'), ('top5', 'top-5'), ('top1_ema', 'top-1 EMA'))


def plot_curves(metrics: Path, out: Path, val_curves: Sequence[Tuple[str, str]] = ACCURACY_CURVES,
                val_x: str = 'epoch', val_label: str = 'accuracy (%)') -> None:
    """training_curves.png: training loss and lr per update, and the validation rows' `val_curves` ((key,
    legend) pairs; the classifier's accuracies unless given) against `val_x` ('epoch' or 'update')."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f'note: matplotlib is not installed (pip install matplotlib), so {out.name} was not drawn')
        return
    rows = MetricsLog.read(metrics)
    train = [r for r in rows if r['kind'] == 'train']
    val = [r for r in rows if r['kind'] == 'val']
    fig = Figure(figsize=(13, 3.6), layout='constrained')
    ax_loss, ax_lr, ax_acc = fig.subplots(1, 3)
    ax_loss.plot([r['update'] for r in train], [r['loss'] for r in train])
    ax_loss.set(xlabel='update', ylabel='train loss', title='training loss')
    ax_lr.plot([r['update'] for r in train], [r['lr'] for r in train])
    ax_lr.set(xlabel='update', ylabel='lr', title='learning rate')
    for key, label in val_curves:
        if any(key in r for r in val):
            ax_acc.plot([r[val_x] for r in val if key in r], [r[key] for r in val if key in r], 'o-', label=label)
    ax_acc.set(xlabel=val_x, ylabel=val_label, title='validation')
    ax_acc.legend()
    fig.savefig(out, dpi=110)


def open_metrics_log(accelerator, args, output: Path, resumed_at: Optional[int]) -> MetricsLog:
    """metrics.jsonl (and the --log-with trackers): continued after update ``resumed_at`` when the run
    resumes, else started afresh."""
    if args.log_with:
        accelerator.init_trackers('spformer', config={k: v for k, v in vars(args).items()
                                                      if isinstance(v, (int, float, str, bool))})
    metrics = MetricsLog(accelerator, output / 'metrics.jsonl', resumed_at)
    if accelerator.is_main_process and resumed_at is None and metrics.path.exists():
        metrics.path.unlink()
    return metrics
