"""Batched head statistics equal TransformerLens's ``head_detector.detect_head`` prompt by prompt.

The peer runs each prompt alone (its list API); ours pads prompts of different lengths into one
batch. A zoo/native model has no tokenizer, so the peer gets a stand-in whose ``to_tokens`` maps
a prompt's index to its token ids (everything else is the bridge's own ``run_with_cache``).
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from transformer_lens import head_detector

from mechscope.circuits.head_stats import HeadStatistics, detection_patterns, head_statistics
from mechscope.errors import InputError
from mechscope.models import load
from mechscope.models.zoo.groundtruth import GroundTruth
from mechscope.models.zoo.recipes import RECIPES
from mechscope.models.zoo.truth import detector_scores
from mechscope.store import Store
from mechscope.tasks.induction import induction

TINY = "native:n_layers=2,d_model=32,n_heads=4,d_head=8,d_mlp=64,d_vocab=20,n_ctx=64,seed=1"
DETECTORS = ("previous_token", "duplicate_token", "induction")


class RowsModel:
    """``detect_head``'s view of a model whose prompts are token rows: prompt ``"i"`` is row i."""

    def __init__(self, model, rows: list[torch.Tensor]) -> None:
        self.model, self.rows, self.cfg = model, rows, model.cfg

    def to_tokens(self, key):
        return self.rows[0 if isinstance(key, list) else int(key)][None]

    def run_with_cache(self, *args, **kwargs):
        return self.model.run_with_cache(*args, **kwargs)


def tl_scores(model, rows, kind, **flags) -> torch.Tensor:
    keys = [str(i) for i in range(len(rows))]
    with torch.no_grad():
        return head_detector.detect_head(RowsModel(model, rows), keys, f"{kind}_head", **flags)


def repeated_rows(n_vocab: int, sizes, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for size in sizes:
        r = torch.randint(1, n_vocab, (size,), generator=g)
        out.append(torch.cat([torch.tensor([0]), r, r]))
    return out


@pytest.fixture(scope="module")
def tiny():
    return load(TINY)


@pytest.fixture(scope="module")
def zoo():
    return load("zoo:induction")


@pytest.mark.parametrize(("error_measure", "exclude_bos", "exclude_current_token"),
                         [("mul", False, False), ("mul", True, True), ("abs", False, False),
                          ("abs", True, False), ("abs", False, True)])  # fmt: skip
@pytest.mark.parametrize("name", ["tiny", "zoo"])
def test_equals_detect_head(
    name, error_measure, exclude_bos, exclude_current_token, request
) -> None:
    model = request.getfixturevalue(name)
    rows = repeated_rows(int(model.cfg.d_vocab), [5, 11, 3, 14])  # different lengths
    ours = head_statistics(model, [r.tolist() for r in rows], error_measure=error_measure,
                           exclude_bos=exclude_bos, exclude_current_token=exclude_current_token,
                           batch_size=3, progress=False)  # fmt: skip
    for kind in DETECTORS:
        want = tl_scores(model, rows, kind, exclude_bos=exclude_bos,
                         exclude_current_token=exclude_current_token, error_measure=error_measure)  # fmt: skip
        torch.testing.assert_close(ours.scores[kind], want, atol=1e-6, rtol=1e-5, msg=kind)


def test_padding_invariance(zoo) -> None:
    rows = repeated_rows(int(zoo.cfg.d_vocab), [4, 20, 9, 15, 6, 12])
    lists = [r.tolist() for r in rows]
    batched = head_statistics(zoo, lists, batch_size=6, progress=False)
    for i, row in enumerate(lists):
        alone = head_statistics(zoo, [row], progress=False)
        for kind, per in batched.per_prompt.items():
            torch.testing.assert_close(per[i], alone.per_prompt[kind][0], atol=1e-6, rtol=1e-5)
    shuffled = head_statistics(zoo, lists[::-1], batch_size=2, progress=False)
    for kind, grid in batched.scores.items():
        torch.testing.assert_close(grid, shuffled.scores[kind], atol=1e-6, rtol=1e-5)


def test_zoo_induction_heads_score_near_one(zoo) -> None:
    """With rows that have no target left out (the zoo's own ground truth), layer 1's induction
    heads score ~0.93 and layer 0's previous-token head ~0.96, equal to the recorded truth."""
    seed, n = RECIPES["induction"].eval_seed, 8
    rep = max(3, min(20, (int(zoo.cfg.n_ctx) - 2) // 2))
    b = induction(n, seq_len=rep, d_vocab=int(zoo.cfg.d_vocab), seed=seed)
    rows = torch.cat([b.clean, b.answer[:, None]], 1)
    ours = head_statistics(zoo, rows, target_rows_only=True, kinds=("previous_token", "induction"),
                           progress=False)  # fmt: skip
    want = detector_scores(zoo, n=n, seed=seed)
    truth = GroundTruth.load("zoo:induction").head_scores
    for kind in ("previous_token", "induction"):
        torch.testing.assert_close(ours.scores[kind].double(), torch.tensor(want[kind]).double(),
                                   atol=1e-4, rtol=0)  # fmt: skip
        torch.testing.assert_close(ours.scores[kind].double(), torch.tensor(truth[kind]).double(),
                                   atol=2e-2, rtol=0)  # fmt: skip
    assert bool((ours.scores["induction"][1] > 0.9).all())
    assert ours.heads("induction", 0.9) == sorted(
        ours.heads("induction", 0.9), key=lambda h: -ours.scores["induction"][h]
    )
    assert {h for h in ours.heads("induction", 0.5)} == {(1, 0), (1, 1), (1, 2), (1, 3)}
    # the plain detector score of the same heads: about half (the first copy has no target)
    plain = head_statistics(zoo, rows, kinds=("induction",), progress=False).scores["induction"]
    assert bool((plain[1] < 0.6).all()) and bool((plain[1] > 0.3).all())


def test_sink_share_of_a_planted_sink(tiny) -> None:
    from mechscope.circuits.sinks import act_key_scores

    pattern = torch.zeros(1, 2, 6, 6)
    pattern[0, 0, :, 0] = 1.0  # head 0: everything on key 0
    pattern[0, 1] = torch.eye(6)  # head 1: itself
    scores = act_key_scores(pattern, torch.tensor([6]))
    assert scores[0, 0].tolist() == [1.0, 0, 0, 0, 0, 0]
    torch.testing.assert_close(scores[0, 1], torch.tensor([1 / 6, 1 / 5, 1 / 4, 1 / 3, 1 / 2, 1.0]))
    stats = head_statistics(tiny, [[0, 3, 4, 5, 6, 7, 8]], kinds=("sink",), progress=False)
    share = stats.scores["sink"]
    assert share.shape == (2, 4) and bool(((share >= 0) & (share <= 1 + 1e-6)).all())


def test_detection_patterns_match_transformer_lens() -> None:
    toks = torch.tensor([[0, 3, 4, 3, 4, 5, 3]])
    mine = detection_patterns(toks, torch.tensor([7]))[0]
    for i, name in enumerate(DETECTORS):
        want = getattr(head_detector, f"get_{name}_head_detection_pattern")(toks)
        assert torch.equal(mine[i], want.float()), name


def test_result_round_trip_frame_figure_payload(zoo) -> None:
    stats = head_statistics(
        zoo, [r.tolist() for r in repeated_rows(int(zoo.cfg.d_vocab), [6, 9])], progress=False
    )
    frame = stats.to_frame()
    assert list(frame.columns) == [
        "layer",
        "head",
        "previous_token",
        "duplicate_token",
        "induction",
        "sink",
    ]
    assert len(frame) == 8
    assert stats.figure(kind="sink").data[0].z.shape == (2, 4)
    body = stats.payload()
    assert (
        body["kind"] == "induction"
        and len(body["scores"]) == 2
        and set(body["by_kind"]) == set(stats.scores)
    )
    store = Store(tempfile.mkdtemp())
    assert HeadStatistics.load(store, stats.save(store)) == stats


def test_bad_inputs(tiny) -> None:
    with pytest.raises(InputError, match="unknown head kinds"):
        head_statistics(tiny, [[0, 1, 2]], kinds=("retrieval",), progress=False)
    with pytest.raises(InputError, match="2 to 63 tokens"):
        head_statistics(tiny, [[0, 1, 2], [3]], progress=False)
    with pytest.raises(InputError, match="context"):
        head_statistics(tiny, [list(range(10)) * 7], progress=False)
    with pytest.raises(InputError, match="batch_size"):
        head_statistics(tiny, [[0, 1, 2]], batch_size=0, progress=False)
    with pytest.raises(InputError, match="tokenizer"):
        head_statistics(tiny, ["some text"], progress=False)
    stats = head_statistics(tiny, [[0, 1, 2]], kinds=("sink",), progress=False)
    with pytest.raises(InputError, match="no 'induction' scores"):
        stats.figure(kind="induction")
