"""spurfast.experiments.erm_study on plain data: the summary over seeds, its check, the table."""
import pytest
import torch

from spurfast.experiments.erm_study import ERMRecipe, InputNormalization, markdown_table, summarize_seeds


def _row(seed, train, test, worst, train_seconds=10.0):
    return {
        "seed": seed, "train_group_acc": train, "test_group_acc": test,
        "memorization_gap": [None if a is None or b is None else a - b for a, b in zip(train, test)],
        "train_avg_acc": 100.0, "train_worst_group_acc": min(a for a in train if a is not None),
        "test_avg_acc": sum(test) / len(test), "test_weighted_acc": 95.0, "test_worst_group_acc": worst,
        "train_seconds": train_seconds, "epoch_seconds": [train_seconds / 2] * 2,
    }


ROWS = [
    _row(0, [100.0, 100.0, 100.0, 100.0], [99.0, 80.0, 40.0, 97.0], 40.0, 10.0),  # avg 79, 39 below
    _row(1, [100.0, 99.0, 100.0, 100.0], [97.0, 70.0, 30.0, 99.0], 30.0, 12.0),  # avg 74, 44 below
]


def test_summary_means_stds_and_check():
    s = summarize_seeds(ROWS)
    assert s["seeds"] == [0, 1]
    assert s["train_group_acc"] == [100.0, 99.5, 100.0, 100.0]
    assert s["test_group_acc"] == [98.0, 75.0, 35.0, 98.0]
    assert s["test_group_acc_std"] == [1.0, 5.0, 5.0, 1.0]
    assert s["memorization_gap"] == [2.0, 24.5, 65.0, 2.0]
    assert s["test_avg_acc"] == {"mean": 76.5, "std": 2.5}
    assert s["test_worst_group_acc"] == {"mean": 35.0, "std": 5.0}
    assert s["test_avg_minus_worst"] == {"mean": 41.5, "std": 2.5}
    assert s["train_seconds"] == {"mean": 11.0, "std": 1.0}
    assert s["all_train_groups_fit"] and s["worst_well_below_avg"] and s["claim_met"]
    # each half of the check fails on its own
    s = summarize_seeds(ROWS, fit_threshold=99.5)
    assert not s["all_train_groups_fit"] and s["worst_well_below_avg"] and not s["claim_met"]
    s = summarize_seeds(ROWS, min_worst_gap=40.0)  # seed 0 is 39 below
    assert s["all_train_groups_fit"] and not s["worst_well_below_avg"] and not s["claim_met"]


def test_summary_skips_empty_groups_and_rejects_bad_rows():
    rows = [_row(0, [100.0, None, 100.0, 100.0], [90.0, 50.0, 60.0, 90.0], 50.0)]
    s = summarize_seeds(rows)
    assert s["train_group_acc"] == [100.0, None, 100.0, 100.0] and s["memorization_gap"][1] is None
    assert s["all_train_groups_fit"] and s["test_avg_minus_worst"] == {"mean": 22.5, "std": 0.0}
    with pytest.raises(ValueError, match="at least one"):
        summarize_seeds([])
    with pytest.raises(ValueError, match="test_worst_group_acc"):
        summarize_seeds([{k: v for k, v in ROWS[0].items() if k != "test_worst_group_acc"}])
    with pytest.raises(ValueError, match="4 entries"):
        summarize_seeds([ROWS[0], dict(ROWS[1], test_group_acc=[1.0, 2.0])])


def test_markdown_table_rows_and_check():
    results = {"small_cnn": {"runs": ROWS, "summary": summarize_seeds(ROWS)}}
    lines = markdown_table(results, ["a", "b", "c", "d"]).splitlines()
    assert lines[2] == ("| small_cnn | 0 | 100.0 / 100.0 / 100.0 / 100.0 | 99.0 / 80.0 / 40.0 / 97.0 | "
                        "1.0 / 20.0 / 60.0 / 3.0 | 79.0 | 40.0 | 10 (5.0) |")
    assert lines[4].startswith("| small_cnn | **mean** | 100.0 / 99.5 / 100.0 / 100.0 |")
    assert "| 76.5 ± 2.5 | 35.0 ± 5.0 | 11 |" in lines[4]
    assert "Groups: g0 = a, g1 = b, g2 = c, g3 = d." in lines
    assert lines[-1] == ("- small_cnn: every training group >= 99 %: yes; "
                         "test worst >= 20 points below test avg: yes")


def test_recipe_and_input_normalization():
    recipe = ERMRecipe("efficientnet_lite0", epochs=1, lr=1e-3, pretrained=True, normalization="imagenet")
    norm = recipe.to_dict()["normalization"]
    assert norm["kind"] == "imagenet" and norm["mean"] == [0.485, 0.456, 0.406] and norm["std"] == [0.229, 0.224, 0.225]
    with pytest.raises(ValueError, match="pretrained"):
        ERMRecipe("small_cnn", epochs=1, lr=1e-3, pretrained=True)
    with pytest.raises(ValueError, match="normalization"):
        ERMRecipe("small_cnn", epochs=1, lr=1e-3, normalization="cifar")
    x = torch.rand(2, 3, 4, 4)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(InputNormalization(norm["mean"], norm["std"])(x), (x - mean) / std)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        InputNormalization(norm["mean"], norm["std"])(torch.rand(2, 1, 4, 4))
