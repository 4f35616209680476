"""Training with Accelerate: the machinery of the training scripts (``train_imagenet.py``,
``train_segmentation.py``), which read top to bottom as Accelerate's examples do and import the rest from here.

The modules, in the order a run uses them:

    spformer.training.config       flag groups and train_imagenet.py's parser, a YAML file of defaults (--config)
                                   as flags, the checks of a combination, the effective configuration; ConfigError
    spformer.training.checkpoints  the lock on the output folder; TrainState, atomic checkpoints with manifests,
                                   their checks and resumption (nothing loaded can run code)
    spformer.training.rng          seeds from keys such as (seed, epoch, index), and loader iteration that leaves
                                   the training loop's RNGs alone: a resumed run repeats an uninterrupted one
    spformer.training.data         ImageFolder and Hugging Face datasets, per-sample seeded augmentation, the
                                   epoch's order, unreadable images (--skip-bad-images), transforms, loaders
    spformer.training.model        the model to train, from the weights it starts from; buffers kept equal
    spformer.training.metrics      validation (top-1, top-5, loss), metrics.jsonl, training_curves.png
    spformer.training.export       final/: the weights, their EMA, configuration and results; the Hub client
    spformer.training.dump         SPFORMER_TRAIN_TEST_DUMP: the tests' record of what a run saw and computed
    spformer.training.segmentation train_segmentation.py's flags, segmentation data and paired augmentation,
                                   whole-image and sliding-window inference, mIoU validation, pictures

Importing this package imports none of them, and none imports matplotlib until the curves are drawn.
"""
