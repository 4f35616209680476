"""ImageNet training and fine-tuning of SPFormer with Accelerate (DeiT recipe) -- not written yet.

Planned as issue 4: ``accelerate launch train_imagenet.py --model spformer_small_sp16_224 --data-dir ...``.
Until then, timm's own training script trains these models after ``import spformer``.
"""
import sys


def main() -> int:
    print('train_imagenet.py is not implemented yet (issue 4). Meanwhile, timm\'s train.py trains '
          'spformer_* models once `import spformer` has registered them.', file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main())
