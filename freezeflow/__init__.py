"""freezeflow: fast, repeatable CNN transfer learning.

    core/          torch, torchvision, numpy, Pillow, PyYAML only: runs on a bare GPU box
      data/        image folders, decoding, the prepared (decoded-once) dataset, augmentation
      models/      the backbone registry, staged networks, BatchNorm folding, model files
      train/       freezing strategies, the training loop, the frozen-feature cache, lr finder, DDP
      infer/       evaluation and prediction with a trained model
    integrations/  MLflow, Optuna, DVC and the team servers: adapters over the core
    app/           the CLI, the pipeline's steps, progress display, bundled sample data

`flows/` and `tasks/` (Prefect) and `bench/` (benchmarks) live beside this package.
Nothing here runs at import time.
"""
