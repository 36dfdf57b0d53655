"""Inference with a trained model folder: class probabilities and metrics on a split of the prepared data
(evaluate), top-3 labels for image files (predict), and the served model's rows for images as bytes, base64
or arrays (serve)."""
