"""Full zoo training reproduces the shipped checkpoint.

CI retrains the two quickest recipes (``ioi`` and ``facts-attn``, 1-3 minutes each) every run;
the others take 5-12 minutes each and run when asked for:

    MECHSCOPE_FULL_ZOO_TRAIN=1 python -m pytest tests/real/test_zoo_train.py

Training is seeded and single-threaded, so on one machine a retrain gives the same weights bit
for bit. Across machines (another CPU, another BLAS code path) float reductions differ in the last
bits and 3,000 optimiser steps amplify that: measured against the shipped checkpoints, a retrain
on another machine differed by up to 0.2 in single weights for facts-attn (0.001 for ioi), kept
accuracy 1.000, and moved patching effects by up to 0.03. Hence the one-point tolerance on
accuracy, and circuit membership compared only for heads whose shipped effect is at least 0.05
away from the 0.2 threshold (facts-attn's L1H1 sits at 0.19: a diffuse circuit, not a regression).
Beyond membership, the retrained heads' patching effects must be ordered like the shipped ones:
Harrell's concordance of the new effects with the shipped ones >= 0.9, comparing only heads whose
shipped effects differ by at least 0.05 (closer pairs are within a retrain's drift).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from mechscope.models.zoo import RECIPES, train_zoo, zoo_card, zoo_names
from mechscope.models.zoo.groundtruth import THRESHOLD, GroundTruth, concordance

pytestmark = pytest.mark.slow

ALWAYS = {"ioi", "facts-attn"}
ALL = os.environ.get("MECHSCOPE_FULL_ZOO_TRAIN") == "1"


def _params() -> list:
    out = []
    for name in sorted(RECIPES):
        if name not in zoo_names():
            continue
        skip = pytest.mark.skipif(
            not ALL and name not in ALWAYS,
            reason=f"retraining {name} takes minutes; set MECHSCOPE_FULL_ZOO_TRAIN=1",
        )
        out.append(pytest.param(name, marks=skip))
    return out


@pytest.mark.timeout(1800)  # the suite's 600 s per test is shorter than the longest recipe
@pytest.mark.parametrize("name", _params())
def test_full_training_reproduces_accuracy(tmp_path, name: str) -> None:
    shipped = zoo_card(name)
    card = train_zoo(name, out_dir=tmp_path, progress=False)
    assert abs(card.accuracy - shipped.accuracy) <= 0.01
    assert card.card["recipe"] == shipped.card["recipe"]
    # circuit membership must agree wherever the shipped effect is clearly off the threshold
    ship, new = GroundTruth.load(shipped.directory), GroundTruth.load(card.directory)
    for table in ("head_denoise", "head_noise"):
        for (layer, head), effect in np.ndenumerate(getattr(ship, table)):
            if abs(abs(effect) - THRESHOLD) < 0.05:
                continue
            now = getattr(new, table)[layer, head]
            in_ship, in_new = abs(effect) >= THRESHOLD, abs(now) >= THRESHOLD
            assert in_ship == in_new, (table, layer, head, effect, now)
    # and the effects, as continuous numbers, must be ordered the same way
    assert concordance(ship.effect(), new.effect(), min_gap=0.05) >= 0.9
    assert card.card["train_seconds"] <= 15 * 60
