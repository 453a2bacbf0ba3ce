"""Linear probes on traced activations (scikit-learn estimators).

A probe asks whether a label is linearly decodable from one site: a layer's residual stream, one
head's output, or a set of FFN neurons, at one position. :class:`LinearProbe` is a scikit-learn
classifier (``fit/predict/score``, works with ``clone``, pipelines and grid search) that accepts
either a feature matrix or a :class:`~mechscope.probes.trace.Trace`; :func:`probe_layers` fits one
probe per layer (and optionally per head) and reports held-out accuracy.

Caveat (Hewitt & Liang 2019): high probe accuracy shows the information is present, not that the
model uses it; compare against a control (shuffled labels, or a random model) — ``probe_layers``
reports the shuffled-label control beside every score.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> X = rng.normal(size=(200, 8)); y = (X[:, 0] > 0).astype(int)
>>> LinearProbe().fit(X[:150], y[:150]).score(X[150:], y[150:]) > 0.9
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mechscope.errors import InputError
from mechscope.probes.trace import Trace


def features(trace: Trace, site: str, layer: int, *, head: int | None = None,
             neurons: Sequence[int] | None = None, position: int = -1) -> np.ndarray:
    """One row of features per prompt: ``site`` at ``layer`` at ``position``.

    ``position`` counts from each prompt's last real token when negative (so ``-1`` is the last
    token of every prompt, whatever its length). With a trace captured at restricted
    positions, ``position`` indexes the captured positions instead.
    """
    act = trace.get(site, layer)
    n = act.shape[0]
    if site == "patterns":
        raise InputError("probe a vector site (resid, heads, head_resid, ffn, ...), not patterns")
    if trace.positions is not None:
        act = act[:, position]
    else:
        pos = torch.full((n,), position) if position >= 0 else trace.lengths + position
        if bool((pos < 0).any()) or bool((pos >= trace.lengths).any()):
            raise InputError(f"position {position} is outside some prompt")
        act = act[torch.arange(n), pos]
    if head is not None:
        if act.ndim != 3:
            raise InputError(f"site {site!r} has no head axis; drop head=")
        act = act[:, head]
    if neurons is not None:
        act = act[..., list(neurons)]
    return act.reshape(n, -1).float().cpu().numpy()


class LinearProbe(ClassifierMixin, BaseEstimator):
    """A standardised logistic-regression probe on one traced site.

    Args:
        site: site name when fitting on a Trace (``resid``, ``heads``, ``ffn``, ...).
        layer: layer of the site.
        head: one head of a head-indexed site, or None for the whole site.
        neurons: a subset of the last axis (e.g. FFN neurons), or None.
        position: position to read (negative from the end of each prompt).
        C: inverse L2 regularisation strength.
        max_iter: solver iterations.
    """

    def __init__(self, site: str = "resid", layer: int = 0, head: int | None = None,
                 neurons: Sequence[int] | None = None, position: int = -1, C: float = 1.0,
                 max_iter: int = 1000) -> None:
        self.site = site
        self.layer = layer
        self.head = head
        self.neurons = neurons
        self.position = position
        self.C = C
        self.max_iter = max_iter

    def _X(self, X: Any) -> np.ndarray:
        if isinstance(X, Trace):
            return features(X, self.site, self.layer, head=self.head, neurons=self.neurons,
                            position=self.position)
        arr = np.asarray(X, dtype=np.float64)
        if arr.ndim != 2:
            raise InputError(f"X must be [n_samples, n_features] or a Trace, got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise InputError("X contains NaN or inf; check the traced activations")
        return arr

    def fit(self, X: Any, y: Any) -> LinearProbe:
        Xa, ya = self._X(X), np.asarray(y)
        if len(Xa) != len(ya):
            raise InputError(f"X has {len(Xa)} rows but y has {len(ya)} labels")
        if len(np.unique(ya)) < 2:
            raise InputError("y has a single class; a probe needs at least two")
        self.model_ = make_pipeline(StandardScaler(),
                                    LogisticRegression(C=self.C, max_iter=self.max_iter))
        self.model_.fit(Xa, ya)
        self.classes_ = self.model_.classes_
        self.n_features_in_ = Xa.shape[1]
        return self

    def predict(self, X: Any) -> np.ndarray:
        return self.model_.predict(self._X(X))

    def predict_proba(self, X: Any) -> np.ndarray:
        return self.model_.predict_proba(self._X(X))

    def decision_function(self, X: Any) -> np.ndarray:
        return self.model_.decision_function(self._X(X))


@dataclass(frozen=True)
class ProbeSweep:
    """Held-out accuracy of one probe per layer (and head), with a shuffled-label control."""

    site: str
    rows: tuple[dict[str, Any], ...]

    def to_frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame.from_records(list(self.rows))

    def best(self) -> dict[str, Any]:
        return max(self.rows, key=lambda r: r["accuracy"])

    def figure(self) -> Any:
        """Accuracy by layer (one line per head when heads were probed), control dashed."""
        import plotly.graph_objects as go

        frame = self.to_frame()
        fig = go.Figure()
        groups = frame.groupby("head", dropna=False) if "head" in frame else [(None, frame)]
        for head, part in groups:
            name = "all" if head is None or head != head else f"head {int(head)}"
            fig.add_trace(go.Scatter(x=part["layer"], y=part["accuracy"], mode="lines+markers",
                                     name=name))
        control = frame.groupby("layer")["control_accuracy"].mean()
        fig.add_trace(go.Scatter(x=control.index, y=control.values, mode="lines",
                                 name="shuffled-label control", line={"dash": "dash"}))
        fig.update_layout(title=f"Linear probe accuracy on {self.site}", xaxis_title="layer",
                          yaxis_title="held-out accuracy", yaxis_range=[0, 1.02])
        return fig


def probe_layers(trace: Trace, y: Any, *, site: str = "resid", per_head: bool = False,
                 position: int = -1, test_size: float = 0.25, seed: int = 0,
                 C: float = 1.0) -> ProbeSweep:
    """Fit a probe at every captured layer (and head) of ``site``; report held-out accuracy."""
    y = np.asarray(y)
    if len(y) != trace.n_prompts:
        raise InputError(f"{len(y)} labels for {trace.n_prompts} traced prompts")
    idx = np.arange(len(y))
    stratify = y if min(np.bincount(np.unique(y, return_inverse=True)[1])) >= 2 else None
    train, test = train_test_split(idx, test_size=test_size, random_state=seed, stratify=stratify)
    shuffled = np.random.default_rng(seed).permutation(y)
    rows = []
    layers = trace.layers(site)
    if not layers:
        raise InputError(f"the trace has no {site!r}; trace it first")
    n_heads = trace.get(site, layers[0]).shape[2] if per_head else 0
    for layer in layers:
        for head in (range(n_heads) if per_head else [None]):
            X = features(trace, site, layer, head=head, position=position)
            probe = LinearProbe(C=C).fit(X[train], y[train])
            control = LinearProbe(C=C).fit(X[train], shuffled[train])
            rows.append({"layer": layer, "head": head,
                         "accuracy": float(probe.score(X[test], y[test])),
                         "control_accuracy": float(control.score(X[test], shuffled[test])),
                         "n_train": len(train), "n_test": len(test)})
    return ProbeSweep(site=site, rows=tuple(rows))
