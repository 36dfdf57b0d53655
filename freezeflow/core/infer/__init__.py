"""Inference with a trained model folder: evaluation on a split (evaluate) and prediction on files (predict)."""
