"""SPFORMER_TRAIN_TEST_DUMP=DIR, a test-only hook (for tests/test_train*.py; never needed in real runs): every
process writes DIR/rank<i>.json (sample indices seen per epoch, the sha256 of each one's augmented image, the
targets (after Mixup), logits and loss of each batch, with --clip-grad the gradient norm of each update before
and after clipping, sha256 of its final weights); the main one also DIR/final_logits.pt."""
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from timm.utils import ModelEmaV3


class RunDump:
    """What a process saw and computed, recorded batch by batch for SPFORMER_TRAIN_TEST_DUMP."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.samples: Dict[int, List[int]] = {}
        self.images: Dict[int, List[str]] = {}
        self.batches: List[Dict[str, Any]] = []
        self.grads: List[Dict[str, Any]] = []

    @classmethod
    def from_environment(cls) -> Optional['RunDump']:
        """A RunDump into $SPFORMER_TRAIN_TEST_DUMP, or None when it is not set."""
        folder = os.environ.get('SPFORMER_TRAIN_TEST_DUMP')
        return cls(Path(folder)) if folder else None

    def inputs(self, epoch: int, batch: Dict[str, torch.Tensor]) -> None:
        """The sample indices of a batch and the sha256 of each augmented image (called before Mixup, which
        mixes the images in place)."""
        self.samples.setdefault(epoch, []).extend(batch['index'].tolist())
        self.images.setdefault(epoch, []).extend(tensor_digest(image) for image in batch['image'])

    def outputs(self, targets: torch.Tensor, logits: torch.Tensor, loss: torch.Tensor) -> None:
        self.batches.append(dict(targets=targets.float().cpu().tolist(), loss=loss.item(),
                                 logits=logits.detach().float().cpu().tolist()))

    def gradient_norm(self, update: int, norm, model: nn.Module) -> None:
        """The gradient norm of an update before clipping (`norm`, clip_grad_norm_'s) and after."""
        self.grads.append(dict(update=update, norm=float(norm), clipped=float(
            torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm()
                                                  for p in model.parameters() if p.grad is not None])))))

    def write(self, accelerator, model: nn.Module, model_ema: Optional[ModelEmaV3]) -> None:
        """rank<i>.json of this process, with the sha256 of its final weights (`model` unwrapped)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        record = dict(process_index=accelerator.process_index, num_processes=accelerator.num_processes,
                      samples={str(k): v for k, v in self.samples.items()},
                      images={str(k): v for k, v in self.images.items()}, batches=self.batches, grads=self.grads,
                      weights_sha256=state_digest(model),
                      ema_sha256=state_digest(model_ema.module) if model_ema is not None else None)
        (self.folder / f'rank{accelerator.process_index}.json').write_text(json.dumps(record))

    def write_final_logits(self, model: nn.Module, model_ema: Optional[ModelEmaV3], input_size, device) -> None:
        """final_logits.pt: the logits of the final weights (`model` unwrapped) and their EMA on a fixed input."""
        x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = dict(model=model.eval()(x.to(device)).float().cpu())
            if model_ema is not None:
                logits['model_ema'] = model_ema.module.eval()(x.to(device)).float().cpu()
        torch.save(dict(input=x, **logits), self.folder / 'final_logits.pt')


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (the test dump's record of an augmented image)."""
    tensor = tensor.detach().cpu().contiguous()
    h = hashlib.sha256(f'{tensor.dtype} {tuple(tensor.shape)} '.encode())
    h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def state_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
