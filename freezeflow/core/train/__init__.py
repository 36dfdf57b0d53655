"""Training: freezing strategies (freezing), lr schedules, the Trainer and its epoch loop (loop), batches
from images or cached features (batches), epoch reports and checkpoint state (state), the frozen-feature
cache (features, over the per-image store: feature_store), callbacks and early stopping (callbacks), the lr
range test, the divergence guard, DDP, and run_training (run). The strategy and schedule tables live one
layer down: freezeflow.core.strategies, freezeflow.core.schedules.

`python -m freezeflow.core.train` trains on a bare box; under torchrun it runs data-parallel."""
