"""Data: ImageFolder scanning and ingest (folders), decoding (images), the one resize + normalize path every
model input takes (preprocess), the prepared dataset decoded once into a uint8 array (prepare), and GPU/CPU
batch augmentation (augment)."""
