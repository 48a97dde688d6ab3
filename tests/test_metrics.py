"""spurfast.metrics against hand-computed values."""
import math

import pytest
import torch
import torch.nn as nn

from spurfast.metrics import GroupAccuracy, evaluate, group_accuracy, memorization_gap

# 8 samples, 4 groups. Group 0: 3 samples, 2 right; group 1: empty; group 2: 1 sample, wrong;
# group 3: 4 samples, 3 right.
PREDS = torch.tensor([0, 0, 1, 0, 1, 1, 1, 0])
LABELS = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
GROUPS = torch.tensor([0, 0, 0, 2, 3, 3, 3, 3])


def _logits(preds, num_classes=2):
    # Logits whose argmax is preds, with distinct magnitudes to make argmax non-trivial.
    logits = torch.randn(preds.numel(), num_classes, generator=torch.Generator().manual_seed(0))
    logits[torch.arange(preds.numel()), preds] = 5.0
    return logits


def test_hand_computed_values():
    r = group_accuracy(PREDS, LABELS, GROUPS, num_groups=4, train_group_counts=[10, 5, 1, 4])
    assert r.group_counts.tolist() == [3, 0, 1, 4]
    assert r.group_correct.tolist() == [2, 0, 0, 3]
    assert r.group_acc[0].item() == pytest.approx(2 / 3)
    assert math.isnan(r.group_acc[1].item())
    assert r.group_acc[2].item() == 0.0 and r.group_acc[3].item() == 0.75
    assert r.worst_group_acc == 0.0 and r.worst_group == 2
    assert r.mean_acc == pytest.approx((2 / 3 + 0 + 0.75) / 3)  # empty group excluded
    assert r.avg_acc == pytest.approx(5 / 8)
    # Weighted by train proportions, empty test group dropped and weights renormalized: (10, 1, 4) / 15.
    assert r.weighted_acc == pytest.approx((10 * 2 / 3 + 1 * 0 + 4 * 0.75) / 15)


def test_logits_and_predictions_agree():
    a = group_accuracy(_logits(PREDS), LABELS, GROUPS, 4)
    b = group_accuracy(PREDS, LABELS, GROUPS, 4)
    assert a.group_correct.tolist() == b.group_correct.tolist()
    assert a.weighted_acc is None


def test_waterbirds_weighted_average():
    # Perfect on the majority groups, 0 on the minorities: weighted acc = majority share of train.
    groups = torch.arange(4).repeat_interleave(10)
    labels = groups // 2
    preds = torch.where((groups == 0) | (groups == 3), labels, 1 - labels)
    r = group_accuracy(preds, labels, groups, 4, train_group_counts=[3498, 184, 56, 1057])
    assert r.avg_acc == 0.5 and r.worst_group_acc == 0.0
    assert r.weighted_acc == pytest.approx((3498 + 1057) / 4795)


def test_accumulator_matches_one_shot_in_any_split():
    torch.manual_seed(0)
    logits = torch.randn(103, 3)
    labels = torch.randint(0, 3, (103,))
    groups = torch.randint(0, 5, (103,))
    whole = group_accuracy(logits, labels, groups, 5)
    acc = GroupAccuracy(5)
    for start in range(0, 103, 17):
        acc.update(logits[start:start + 17], labels[start:start + 17], groups[start:start + 17])
    parts = acc.compute()
    assert torch.equal(parts.group_correct, whole.group_correct)
    assert torch.equal(parts.group_counts, whole.group_counts)
    assert parts.worst_group_acc == whole.worst_group_acc
    acc.reset()
    empty = acc.compute()
    assert empty.group_counts.tolist() == [0] * 5 and math.isnan(empty.worst_group_acc)


def test_memorization_gap():
    train = group_accuracy(LABELS, LABELS, GROUPS, 4)  # perfect
    test = group_accuracy(PREDS, LABELS, GROUPS, 4)
    gap = memorization_gap(train, test)
    assert gap[0].item() == pytest.approx(1 / 3) and gap[2].item() == 1.0 and gap[3].item() == 0.25
    assert math.isnan(gap[1].item())
    with pytest.raises(ValueError, match="groups"):
        memorization_gap(train, group_accuracy(PREDS, LABELS, GROUPS, 5))


@pytest.mark.parametrize(
    "args,match",
    [
        ((PREDS, LABELS, GROUPS + 1, 4), "group_ids must lie"),
        ((PREDS, LABELS, GROUPS - 1, 4), "group_ids must lie"),
        ((PREDS[:5], LABELS, GROUPS, 4), "batch sizes"),
        ((PREDS.float(), LABELS, GROUPS, 4), "logits_or_preds"),
        ((PREDS, LABELS.float(), GROUPS, 4), "integer"),
        ((PREDS, LABELS[:, None], GROUPS, 4), "1-D"),
        ((PREDS, LABELS, GROUPS, 0), "num_groups"),
    ],
)
def test_validation(args, match):
    with pytest.raises(ValueError, match=match):
        group_accuracy(*args)


def test_evaluate_restores_mode_and_accepts_datasets():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2), nn.Dropout(0.5))
    model.train()
    x, y, g = torch.randn(37, 3, 2, 2), torch.randint(0, 2, (37,)), torch.randint(0, 4, (37,))
    with torch.no_grad():
        model.eval()
        expected = group_accuracy(model(x), y, g, 4)
        model.train()
    from_tensors = evaluate(model, (x, y, g), num_groups=4, batch_size=8)
    assert model.training
    assert torch.equal(from_tensors.group_correct, expected.group_correct)
    dataset = torch.utils.data.TensorDataset(x, y, g)
    from_dataset = evaluate(model, dataset, num_groups=4, batch_size=5)
    assert torch.equal(from_dataset.group_correct, expected.group_correct)
    with pytest.raises(ValueError, match="num_groups"):
        evaluate(model, dataset)


def test_to_dict_is_plain_python():
    d = group_accuracy(PREDS, LABELS, GROUPS, 4).to_dict()
    assert d["group_counts"] == [3, 0, 1, 4] and isinstance(d["group_acc"][0], float)
    assert d["worst_group"] == 2
