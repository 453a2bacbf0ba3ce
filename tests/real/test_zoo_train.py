"""Full zoo training reproduces the shipped checkpoint (about 5-15 minutes per recipe).

Too long for CI's budget, so it runs only when asked for:

    MECHSCOPE_FULL_ZOO_TRAIN=1 python -m pytest tests/real/test_zoo_train.py

CI exercises training for a few steps (tests/unit/test_zoo.py); the shipped cards record the
seconds and accuracy of the full runs.
"""

from __future__ import annotations

import os

import pytest

from mechscope.models.zoo import RECIPES, train_zoo, zoo_card, zoo_names

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("MECHSCOPE_FULL_ZOO_TRAIN") != "1",
        reason="full zoo retraining takes minutes per model; set MECHSCOPE_FULL_ZOO_TRAIN=1",
    ),
]


@pytest.mark.parametrize("name", [n for n in sorted(RECIPES) if n in zoo_names()])
def test_full_training_reproduces_accuracy(tmp_path, name: str) -> None:
    shipped = zoo_card(name)
    card = train_zoo(name, out_dir=tmp_path, progress=False)
    assert abs(card.accuracy - shipped.accuracy) <= 0.01
    assert card.card["recipe"] == shipped.card["recipe"]
    assert card.card["train_seconds"] <= 15 * 60
