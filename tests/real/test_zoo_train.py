"""Full zoo training reproduces the shipped checkpoint (minutes per recipe; run on demand).

    pytest tests/real/test_zoo_train.py -m slow
"""

from __future__ import annotations

import pytest

from mechscope.models.zoo import RECIPES, train_zoo, zoo_card, zoo_names

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", [n for n in sorted(RECIPES) if n in zoo_names()])
def test_full_training_reproduces_accuracy(tmp_path, name: str) -> None:
    shipped = zoo_card(name)
    card = train_zoo(name, out_dir=tmp_path, progress=False)
    assert abs(card.accuracy - shipped.accuracy) <= 0.01
    assert card.card["recipe"] == shipped.card["recipe"]
    assert card.card["train_seconds"] <= 15 * 60
