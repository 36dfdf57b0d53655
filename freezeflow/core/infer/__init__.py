"""Inference with a trained model folder: class probabilities and metrics on a split of the prepared data
(evaluate), and top-3 labels for image files (predict)."""
