"""Linear probes: a planted linearly-decodable label is found; shuffled labels stay at chance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import cross_val_score

from mechscope.errors import InputError
from mechscope.probes import LinearProbe, features, probe_layers, trace


def _labelled_prompts(n=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 50, (n, 6), generator=g)
    y = (tokens[:, -1] < 25).long().numpy()  # label = which half of the vocabulary the last token is
    return tokens, y


@pytest.fixture
def planted(tiny):
    """Plant the label along one direction of the token embeddings (tokens < 25 vs the rest)."""
    u = torch.randn(32, generator=torch.Generator().manual_seed(5))
    u = u / u.norm()
    sign = torch.where(torch.arange(50) < 25, 1.0, -1.0)
    with torch.no_grad():
        tiny.embed.weight.add_(2.0 * sign[:, None] * u[None, :])
    return tiny


def test_probe_finds_a_planted_direction(planted):
    tiny = planted
    tokens, y = _labelled_prompts()
    tr = trace(tiny, tokens, sites=("resid", "heads", "ffn"), progress=False)
    sweep = probe_layers(tr, y, site="resid")
    frame = sweep.to_frame()
    assert list(frame["layer"]) == [0, 1]
    assert frame["accuracy"].min() > 0.85, frame
    assert frame["control_accuracy"].max() < 0.75, frame
    heads = probe_layers(tr, y, site="heads", per_head=True)
    assert len(heads.rows) == 2 * 4
    fig = sweep.figure()
    assert fig.layout.title.text.startswith("Linear probe") and len(fig.data) == 2


def test_probe_is_a_sklearn_estimator(planted):
    tiny = planted
    tokens, y = _labelled_prompts()
    tr = trace(tiny, tokens, sites=("resid",), progress=False)
    X = features(tr, "resid", 0)
    assert X.shape == (160, 32)
    probe = LinearProbe(C=0.5)
    assert clone(probe).get_params()["C"] == 0.5
    assert cross_val_score(probe, X, y, cv=3).mean() > 0.85
    fitted = LinearProbe(site="resid", layer=1).fit(tr, y)
    assert fitted.score(tr, y) > 0.9
    assert fitted.predict_proba(tr).shape == (160, 2)


def test_probe_errors(tiny):
    tokens, y = _labelled_prompts(n=20)
    tr = trace(tiny, tokens, sites=("resid", "patterns"), progress=False)
    with pytest.raises(InputError, match="single class"):
        LinearProbe().fit(np.zeros((4, 2)), [1, 1, 1, 1])
    with pytest.raises(InputError, match="rows but y has"):
        LinearProbe().fit(np.zeros((4, 2)), [0, 1])
    with pytest.raises(InputError, match="NaN"):
        LinearProbe().fit(np.full((4, 2), np.nan), [0, 1, 0, 1])
    with pytest.raises(InputError, match="labels for"):
        probe_layers(tr, y[:5])
    with pytest.raises(InputError, match="not patterns"):
        features(tr, "patterns", 0)
