"""prepare: decode once into a keyed, memory-mapped cache; a stratified split every stage shares
(how the split stays put as the data changes: test_split.py)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from freezeflow.core.data.augment import augment_batch
from freezeflow.core.errors import DataError
from freezeflow.core.params import AugmentParams, DataParams, SplitParams
from freezeflow.core.data.prepare import prepare_dataset, split_stratified


def data_params(folder, **kw) -> DataParams:
    return replace(DataParams(dir=str(folder), image_size=32), **kw)


def fake_digests(n: int) -> list[str]:
    return [hashlib.md5(str(i).encode()).hexdigest() for i in range(n)]


def test_split_is_stratified_deterministic_and_covers_every_class():
    labels = np.repeat(np.arange(4), [10, 20, 3, 40])
    classes = ["a", "b", "c", "d"]
    digests = fake_digests(len(labels))
    one = split_stratified(labels, digests, SplitParams(0.15, 0.15, 7), classes)
    two = split_stratified(labels, digests, SplitParams(0.15, 0.15, 7), classes)
    other = split_stratified(labels, digests, SplitParams(0.15, 0.15, 8), classes)
    for name in ("train", "val", "test"):
        assert np.array_equal(one[name], two[name])
        assert set(labels[one[name]]) == {0, 1, 2, 3}, f"a class is missing from {name}"
    assert not np.array_equal(one["val"], other["val"])
    everything = np.concatenate([one["train"], one["val"], one["test"]])
    assert sorted(everything) == list(range(len(labels)))  # disjoint and complete


def test_class_with_too_few_images_is_a_one_line_error():
    with pytest.raises(DataError, match="class folder 'tiny' has 2 usable images"):
        split_stratified(np.array([0, 0, 0, 1, 1]), fake_digests(5), SplitParams(), ["big", "tiny"])
    digests = fake_digests(6)
    digests[5] = digests[4]  # 3 files, 2 distinct contents: identical files share a split, so count once
    with pytest.raises(DataError, match="'tiny' has 2 usable images \\(identical files count once\\)"):
        split_stratified(np.array([0, 0, 0, 1, 1, 1]), digests, SplitParams(), ["big", "tiny"])


def test_prepare_decodes_once_and_reuses_the_cache(tmp_path, shapes_dir):
    out = tmp_path / "prepared"
    first = prepare_dataset(data_params(shapes_dir), out)
    assert first.images.shape == (36, 3, 32, 32) and first.images.dtype == np.uint8
    assert all(isinstance(chunk, np.memmap) for chunk in first.images.arrays)
    stamp = os.stat(first.root / "rows.npy").st_mtime_ns
    calls = []
    again = prepare_dataset(data_params(shapes_dir), out, progress=lambda d, t: calls.append(d))
    assert again.root == first.root and calls == [], "a second prepare must not decode anything"
    assert os.stat(first.root / "rows.npy").st_mtime_ns == stamp
    bigger = prepare_dataset(data_params(shapes_dir, image_size=48), out)
    assert bigger.key != first.key and bigger.images.shape[-1] == 48


def test_changed_image_gives_a_new_key(tmp_path, shapes_dir):
    out = tmp_path / "prepared"
    first = prepare_dataset(data_params(shapes_dir), out)
    path = shapes_dir / "class_0" / "img_000.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(path)
    second = prepare_dataset(data_params(shapes_dir), out)
    assert second.data_hash != first.data_hash and second.key != first.key


def test_prepared_pixels_match_the_decoded_image(tmp_path, shapes_dir):
    prepared = prepare_dataset(data_params(shapes_dir), tmp_path / "prepared")
    files = sorted((shapes_dir / "class_1").glob("*.png"))
    index = prepared.classes.index("class_1")
    row = int(np.flatnonzero(prepared.labels == index)[0])
    expected = np.asarray(Image.open(files[0]).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(prepared.images[row], expected)  # same size: no resampling


def test_bad_files_in_an_uningested_folder_are_skipped_and_listed(tmp_path, shapes_dir):
    (shapes_dir / "class_2" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (shapes_dir / "class_2" / "empty.jpg").write_bytes(b"")
    prepared = prepare_dataset(data_params(shapes_dir), tmp_path / "prepared")
    import json

    manifest = json.loads((prepared.root / "manifest.json").read_text())
    assert {s["reason"] for s in manifest["skipped"]} == {"corrupt", "empty"} or len(manifest["skipped"]) == 2
    assert len(prepared.labels) == 36


def test_augmentation_is_seeded_shape_preserving_and_varied():
    x = torch.rand(8, 3, 32, 32)
    params = AugmentParams(enabled=True, crop_scale=0.5, flip=True, rotate=15)
    a = augment_batch(x, params, torch.Generator().manual_seed(1))
    b = augment_batch(x, params, torch.Generator().manual_seed(1))
    c = augment_batch(x, params, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)


def test_affine_stays_inside_the_image_and_flips_when_asked():
    from freezeflow.core.data.augment import sample_affine

    params = AugmentParams(enabled=True, crop_scale=0.5, flip=True, rotate=0.0)
    theta = sample_affine(512, params, torch.Generator().manual_seed(0))
    sx, sy = theta[:, 0, 0].abs(), theta[:, 1, 1]
    assert ((sx.abs() + theta[:, 0, 2].abs()) <= 1 + 1e-6).all()  # crop window within [-1, 1]
    assert ((sy + theta[:, 1, 2].abs()) <= 1 + 1e-6).all()
    flipped = (theta[:, 0, 0] < 0).float().mean()
    assert 0.4 < flipped < 0.6


def test_the_broadcast_affine_grid_equals_torch_affine_grid():
    """augment.affine_grid replaces F.affine_grid (as costly as the sampling on a CPU): the same points."""
    import torch.nn.functional as F

    from freezeflow.core.data.augment import affine_grid, sample_affine
    from freezeflow.core.params import AugmentParams

    theta = sample_affine(5, AugmentParams(enabled=True, rotate=30.0), torch.Generator().manual_seed(3))
    for height, width in ((64, 64), (32, 48)):
        torch.testing.assert_close(affine_grid(theta, height, width),
                                   F.affine_grid(theta, [5, 3, height, width], align_corners=False))
