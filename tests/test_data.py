"""spurfast.data: the embedded benchmark and the file loaders on tiny fake folders."""
import csv
import os

import pytest
import torch
from PIL import Image

from spurfast.data import (
    WATERBIRDS_TRAIN_COUNTS,
    CelebA,
    DatasetFileError,
    GroupedCSVDataset,
    GroupedImageFolder,
    ImageNetTrainTransform,
    SynthWaterbirds,
    Waterbirds,
    imagenet_eval_transform,
    imagenet_train_transform,
)


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# SynthWaterbirds
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_train():
    return SynthWaterbirds("train", seed=0)


def test_synth_default_train_has_waterbirds_counts(synth_train):
    assert synth_train.images.shape == (4795, 3, 32, 32)
    assert synth_train.images.dtype == torch.float32
    assert synth_train.labels.dtype == torch.int64 and synth_train.group_ids.dtype == torch.int64
    assert synth_train.group_counts().tolist() == list(WATERBIRDS_TRAIN_COUNTS)
    assert float(synth_train.images.min()) >= 0.0 and float(synth_train.images.max()) <= 1.0
    assert torch.equal(synth_train.group_ids, 2 * synth_train.labels + synth_train.backgrounds)
    # Shapes 0/1 belong to label 0, shapes 2/3 to label 1.
    assert torch.equal(synth_train.shapes // 2, synth_train.labels)
    # The background agrees with the label on the majority groups only (~95%).
    agree = (synth_train.backgrounds == synth_train.labels).float().mean().item()
    assert abs(agree - (3498 + 1057) / 4795) < 1e-6


@pytest.mark.parametrize("split", ["val", "test"])
def test_synth_eval_splits_are_balanced(split):
    ds = SynthWaterbirds(split, seed=0, n=400)
    assert ds.group_counts().tolist() == [100, 100, 100, 100]
    assert len(ds) == 400


def test_synth_scaled_and_explicit_counts():
    scaled = SynthWaterbirds("train", n=2000).group_counts()
    assert int(scaled.sum()) == 2000
    expected = torch.tensor(WATERBIRDS_TRAIN_COUNTS, dtype=torch.float64) / 4795 * 2000
    assert (scaled.double() - expected).abs().max() < 1
    assert SynthWaterbirds("train", group_counts=(5, 0, 7, 1)).group_counts().tolist() == [5, 0, 7, 1]


def test_synth_is_deterministic_per_seed_and_split():
    a, b = SynthWaterbirds("train", seed=3, n=64), SynthWaterbirds("train", seed=3, n=64)
    assert torch.equal(a.images, b.images) and torch.equal(a.group_ids, b.group_ids)
    other_seed = SynthWaterbirds("train", seed=4, n=64)
    other_split = SynthWaterbirds("val", seed=3, n=64)
    assert not torch.equal(a.images, other_seed.images)
    assert not torch.equal(a.images[:8], other_split.images[:8])


def test_synth_backgrounds_differ_by_colour(synth_train):
    # The spurious attribute must be easy: mean blue minus mean red separates the backgrounds.
    blue_minus_red = synth_train.images[:, 2].mean((1, 2)) - synth_train.images[:, 0].mean((1, 2))
    water = synth_train.backgrounds == 1
    assert blue_minus_red[water].min() > blue_minus_red[~water].max()


def test_synth_getitem_and_transform():
    ds = SynthWaterbirds("test", n=8, transform=lambda x: x * 2)
    image, label, group_id = ds[3]
    assert torch.equal(image, ds.images[3] * 2)
    assert int(label) == int(ds.labels[3]) and int(group_id) == int(ds.group_ids[3])


def test_synth_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        SynthWaterbirds("training")
    with pytest.raises(ValueError, match="group_counts"):
        SynthWaterbirds("train", group_counts=(1, 2, 3))


# --------------------------------------------------------------------------------------------
# Transforms and file loaders
# --------------------------------------------------------------------------------------------


def _png(path, colour, size=(8, 8)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def test_eval_transform_resizes_crops_and_normalizes():
    out = imagenet_eval_transform()(Image.new("RGB", (20, 10), (255, 0, 128)))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor(
        [0.229, 0.224, 0.225]
    )
    assert torch.allclose(out[:, 100, 100], expected, atol=1e-5)


def test_train_transform_is_seeded_by_torch_rng():
    image = Image.fromarray((torch.rand(40, 30, 3) * 255).byte().numpy())
    t = imagenet_train_transform(size=16)
    torch.manual_seed(0)
    a = t(image)
    torch.manual_seed(0)
    b = t(image)
    c = t(image)
    assert a.shape == (3, 16, 16) and torch.equal(a, b) and not torch.equal(b, c)


@pytest.fixture
def waterbirds_root(tmp_path):
    rows = []
    # (y, place, split): 2 train images per group, 1 val, 1 test.
    for i, (y, place, split) in enumerate(
        [(y, p, 0) for y in (0, 1) for p in (0, 1) for _ in range(2)] + [(y, p, s) for s in (1, 2) for y in (0, 1) for p in (0, 1)]
    ):
        name = f"{y:03d}.Bird/img_{i}.jpg"
        Image.new("RGB", (8, 8), (40 * i % 256, 100 * y, 200 * place)).save(_mkdir(tmp_path / name))
        rows.append([i, name, y, split, place])
    _write_csv(tmp_path / "metadata.csv", ["img_id", "img_filename", "y", "split", "place"], rows)
    return tmp_path


def _mkdir(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_waterbirds_reads_metadata(waterbirds_root):
    train = Waterbirds(waterbirds_root, "train", image_size=8, resize=8, augment=False)
    assert len(train) == 8 and train.group_counts().tolist() == [2, 2, 2, 2]
    assert train.group_names == ["landbird/land", "landbird/water", "waterbird/land", "waterbird/water"]
    image, label, group_id = train[5]
    assert image.shape == (3, 8, 8) and group_id == 2 * label + int(train.attrs[5])
    assert len(Waterbirds(waterbirds_root, "test")) == 4
    val = Waterbirds(waterbirds_root, "val")
    assert val[0][0].shape == (3, 224, 224)
    assert isinstance(Waterbirds(waterbirds_root, "train").transform, ImageNetTrainTransform)


def test_waterbirds_errors(waterbirds_root, tmp_path_factory):
    with pytest.raises(ValueError, match="split"):
        Waterbirds(waterbirds_root, "dev")
    with pytest.raises(DatasetFileError, match="metadata"):
        Waterbirds(tmp_path_factory.mktemp("empty"), "train")
    os.remove(waterbirds_root / "000.Bird" / "img_0.jpg")  # a training image
    with pytest.raises(FileNotFoundError, match="missing"):
        Waterbirds(waterbirds_root, "train")
    _write_csv(waterbirds_root / "metadata.csv", ["img_id", "img_filename", "y", "split"], [[0, "a.jpg", 0, 0]])
    with pytest.raises(ValueError, match="place"):
        Waterbirds(waterbirds_root, "train")


@pytest.mark.parametrize("nested,encoding", [(False, "pm1"), (True, "01")])
def test_celeba_groups_blond_by_male(tmp_path, nested, encoding):
    image_dir = tmp_path / "img_align_celeba" / ("img_align_celeba" if nested else "")
    rows, parts = [], []
    neg = -1 if encoding == "pm1" else 0
    # (blond, male, partition)
    spec = [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 0, 0), (1, 1, 0), (0, 0, 1), (1, 1, 2)]
    for i, (blond, male, part) in enumerate(spec):
        name = f"{i:06d}.jpg"
        _png(str(image_dir / name), (10 * i, 0, 0))
        rows.append([name, 1 if blond else neg, 1 if male else neg, neg])
        parts.append([name, part])
    _write_csv(tmp_path / "list_attr_celeba.csv", ["image_id", "Blond_Hair", "Male", "Smiling"], rows)
    _write_csv(tmp_path / "list_eval_partition.csv", ["image_id", "partition"], parts)
    train = CelebA(tmp_path, "train", image_size=8, resize=8, augment=False)
    assert train.group_ids.tolist() == [0, 1, 2, 2, 3]
    assert train[4][0].shape == (3, 8, 8)
    assert CelebA(tmp_path, "test").group_ids.tolist() == [3]
    smiling = CelebA(tmp_path, "val", target="Smiling", spurious="Blond_Hair")
    assert smiling.labels.tolist() == [0] and smiling.attrs.tolist() == [0]
    with pytest.raises(ValueError, match="Wavy_Hair"):
        CelebA(tmp_path, "train", target="Wavy_Hair")


def test_grouped_csv_dataset(tmp_path):
    rows = []
    for i in range(6):
        _png(str(tmp_path / "imgs" / f"{i}.png"), (i * 40, 0, 0))
        rows.append([f"imgs/{i}.png", i % 2, (i // 2) % 3, "train" if i < 4 else "test"])
    _write_csv(tmp_path / "data.csv", ["file", "y", "a", "fold"], rows)
    kwargs = dict(path_col="file", label_col="y", attr_col="a")
    full = GroupedCSVDataset(tmp_path / "data.csv", tmp_path, **kwargs, transform=imagenet_eval_transform(8, 8))
    assert full.num_attrs == 3 and full.num_groups == 6
    assert full.group_ids.tolist() == [0, 3, 1, 4, 2, 5]
    image, label, group = full[2]
    assert image.shape == (3, 8, 8) and (label, group) == (0, 1)
    test = GroupedCSVDataset(tmp_path / "data.csv", tmp_path, **kwargs, split_col="fold", split="test")
    assert len(test) == 2 and test.num_groups == 6  # class/attribute counts from the whole file
    with pytest.raises(ValueError, match="no row"):
        GroupedCSVDataset(tmp_path / "data.csv", tmp_path, **kwargs, split_col="fold", split="val")
    with pytest.raises(ValueError, match="label"):
        GroupedCSVDataset(tmp_path / "data.csv", tmp_path, path_col="file", label_col="label", attr_col="a")


def test_grouped_csv_numeric_split_names(tmp_path):
    _png(str(tmp_path / "a.png"), (0, 0, 0))
    _png(str(tmp_path / "b.png"), (0, 0, 0))
    _write_csv(tmp_path / "m.csv", ["p", "y", "a", "s"], [["a.png", 0, 1, 0], ["b.png", 1, 0, 2]])
    ds = GroupedCSVDataset(tmp_path / "m.csv", tmp_path, "p", "y", "a", split_col="s", split="test")
    assert ds.paths == [str(tmp_path / "b.png")] and ds.group_ids.tolist() == [2]


def test_grouped_image_folder(tmp_path):
    layout = {("landbird", "land"): 2, ("landbird", "water"): 1, ("waterbird", "water"): 3}
    for (label, attr), count in layout.items():
        for i in range(count):
            _png(str(tmp_path / label / attr / f"{i}.png"), (0, 0, 0))
    (tmp_path / "waterbird" / "water" / "notes.txt").write_text("not an image")
    ds = GroupedImageFolder(tmp_path, transform=imagenet_eval_transform(8, 8))
    assert ds.class_names == ["landbird", "waterbird"] and ds.attr_names == ["land", "water"]
    assert ds.group_counts().tolist() == [2, 1, 0, 3]
    assert ds.group_names[3] == "waterbird/water"
    assert ds[5][0].shape == (3, 8, 8) and ds[5][2] == 3
    with pytest.raises(FileNotFoundError):
        GroupedImageFolder(tmp_path / "nope")
