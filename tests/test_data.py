import numpy as np
import pytest
import torch

from detptq_mini.data import CLASS_NAMES, ShapesDataset, batches


def test_same_seed_same_images_bit_for_bit():
    a, b = ShapesDataset("calib", 12, seed=3), ShapesDataset("calib", 12, seed=3)
    assert torch.equal(a.images_u8, b.images_u8)
    for (_, ta), (_, tb) in zip(a, b):
        assert torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])


def test_prefix_stable():
    small, big = ShapesDataset("train", 5, seed=1), ShapesDataset("train", 20, seed=1)
    assert torch.equal(small.images_u8, big.images_u8[:5])
    assert small.to_coco()["annotations"] == [
        a for a in big.to_coco()["annotations"] if a["image_id"] <= 5
    ]


def test_splits_and_seeds_are_disjoint():
    imgs = [ShapesDataset(s, 4, seed=k).images_u8 for s in ("train", "val", "calib") for k in (0, 1)]
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert not torch.equal(imgs[i][0], imgs[j][0])


def test_items_follow_the_contract():
    ds = ShapesDataset("val", 30, seed=0)
    sizes, counts, labels = [], [], set()
    for img, t in ds:
        assert img.shape == (3, 128, 128) and img.dtype == torch.float32
        assert 0.0 <= img.min() and img.max() <= 1.0
        b = t["boxes"]
        assert b.shape[1] == 4 and t["labels"].dtype == torch.int64 and len(b) == len(t["labels"])
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert b.min() >= 0 and b.max() <= 128
        sizes += torch.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]).tolist()
        counts.append(len(b))
        labels |= set(t["labels"].tolist())
    assert labels == set(range(len(CLASS_NAMES)))
    # nominal sizes 8-48 px; tight boxes of rotated squares/crosses reach about 1.16x that
    assert 4 <= min(sizes) and max(sizes) <= 56 and max(sizes) >= 30
    assert max(counts) >= 3  # several objects per image


def test_coco_export_ids():
    ds = ShapesDataset("val", 3, seed=0)
    coco = ds.to_coco()
    assert [im["id"] for im in coco["images"]] == [1, 2, 3]
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4]
    first = [a for a in coco["annotations"] if a["image_id"] == 1]
    t = ds[0][1]
    assert [a["category_id"] for a in first] == (t["labels"] + 1).tolist()
    x1, y1, x2, y2 = t["boxes"][0].tolist()
    assert first[0]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])


@pytest.mark.parametrize("kwargs, word", [
    (dict(split="test", size=3), "split"),
    (dict(split="val", size=0), "size"),
    (dict(split="val", size=-2), "size"),
    (dict(split="val", size=2.5), "size"),
    (dict(split="val", size=2, seed=-1), "seed"),
    (dict(split="val", size=2, image_size=20), "image_size"),
])
def test_bad_arguments_name_the_problem(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ShapesDataset(**kwargs)


def test_batches_cover_the_dataset_in_order():
    ds = ShapesDataset("calib", 10, seed=0)
    got = list(batches(ds, 4))
    assert [len(x) for x, _ in got] == [4, 4, 2]
    assert torch.equal(torch.cat([x for x, _ in got]), ds.images())
    assert np.array_equal(got[2][1][1]["labels"].numpy(), ds[9][1]["labels"].numpy())
