"""spurfast.experiments.memorization's pieces, and the report's strict JSON."""
import json
import math

import pytest

from spurfast.experiments.memorization import StudyConfig, group_roles, spearman, tracin_epochs, tracin_weights
from spurfast.report.study import json_safe


def test_group_roles_default_to_groups_under_half_the_mean_size():
    assert group_roles([3498, 184, 56, 1057]) == ([0, 3], [1, 2])          # Waterbirds
    assert group_roles([71629, 66874, 22880, 1387]) == ([0, 1, 2], [3])    # CelebA blond/male
    assert group_roles([10, 0, 2, 9]) == ([0, 3], [2])                      # an empty group is neither


def test_group_roles_checks_what_it_is_given():
    assert group_roles([50, 50, 50, 50], minority=[1]) == ([0, 2, 3], [1])
    with pytest.raises(ValueError, match="out of range or empty"):
        group_roles([50, 0, 50, 50], minority=[1])
    with pytest.raises(ValueError, match="at least one minority"):
        group_roles([50, 50, 50, 50])


@pytest.mark.parametrize("field, value", [("epochs", 0), ("repeats", 0), ("ks", []), ("ks", [0]), ("seeds", [])])
def test_study_config_rejects_bad_settings(field, value):
    with pytest.raises(ValueError, match=field):
        StudyConfig(**{field: value})


def test_tracin_weights_integrate_the_cosine_schedule():
    cfg = StudyConfig(epochs=30, tracin_every=5, lr=2e-3, lr_schedule="cosine")
    epochs = tracin_epochs(cfg)
    assert epochs == [5, 10, 15, 20, 25, 30]
    weights = tracin_weights(cfg, epochs)
    # the weights sum to the integral of the rate over all epochs: lr * epochs / 2 for a cosine to 0
    assert math.isclose(sum(weights), 2e-3 * 30 / 2, rel_tol=1e-3)
    assert weights == sorted(weights, reverse=True)
    assert tracin_epochs(StudyConfig(epochs=12, tracin_every=5)) == [5, 10, 12]


def test_spearman_matches_hand_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_json_safe_makes_strict_json():
    data = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], 3: "x"}
    text = json.dumps(json_safe(data), allow_nan=False)
    assert json.loads(text) == {"a": None, "b": [1.0, None, {"c": None}], "3": "x"}
