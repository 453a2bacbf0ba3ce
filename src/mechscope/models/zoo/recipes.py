"""Training recipes of the zoo: one frozen dataclass per checkpoint, in the table :data:`RECIPES`.

A recipe holds every hyper-parameter that decides a checkpoint: the model shape (a
``TransformerBridgeConfig`` dict for ``TransformerBridge.boot_native``), the optimiser, the number
of steps, the task parameters and the seed. ``mechscope zoo train NAME`` runs
:func:`mechscope.models.zoo.train.train_zoo` on ``RECIPES[NAME]``; the recipe is copied into the
checkpoint's card so a checkpoint always says how it was made.

Each task is built so that the intended mechanism is the only way to solve it (see each recipe's
``mechanism``): random tokens (no n-gram statistics), random places (no positional shortcut),
loss only on the positions the mechanism can predict.

>>> sorted(RECIPES)
['facts', 'facts-attn', 'induction', 'ioi', 'retrieval']
>>> RECIPES["induction"].model_config()["attn_only"]
True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

TaskName = Literal["induction", "retrieval", "facts", "ioi"]


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """Everything that decides one zoo checkpoint.

    Attributes:
        name: checkpoint name (``zoo:<name>``).
        task: which task family trains and scores it.
        description: one line for listings.
        mechanism: the mechanism the task forces, in words (goes into the card).
        n_layers, d_model, n_heads, d_head, d_mlp, n_ctx, d_vocab: model shape; ``d_mlp=None``
            means attention-only.
        steps, batch_size, lr, weight_decay, warmup: AdamW training (linear warm-up, then cosine
            decay to 10% of ``lr``).
        seed: model initialisation and training data.
        threads: torch CPU threads while training (1: on a shared 2-core machine, two threads
            contending with other work ran 4x slower than one).
        eval_n, eval_seed: size and seed of the fresh evaluation sample.
        head_l1: decoupled group lasso on attention heads: after each optimiser step, the L2 norm
            of each head's W_Q, W_K, W_V, W_O, b_Q, b_K, b_V shrinks by ``lr * head_l1`` (a
            proximal step): heads the task does not need reach zero, so the mechanism
            concentrates in a few heads and the rest stay spare (0 = off).
        pos_embed: ``"learned"`` positional embeddings, or fixed ``"sinusoidal"`` ones (Vaswani et
            al. 2017; frozen during training): a shift by one position is the same linear map at
            every position, so a previous-token head learnt on some positions works on all.
        head_l1_from: fraction of the steps after which the penalty ramps in (linearly, over
            a tenth of the steps), so it cannot stop the mechanism from forming.
        head_l1_until: fraction of the steps after which the penalty is off again: a head shrunk
            to exactly zero gets no gradient (zero W_V and W_O are a fixed point), so it stays
            dead while the surviving heads recover the accuracy the penalty cost.
        task_args: task-specific parameters (documented in :mod:`mechscope.models.zoo.data`).
    """

    name: str
    task: TaskName
    description: str
    mechanism: str
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int | None
    n_ctx: int
    d_vocab: int
    steps: int
    batch_size: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 200
    seed: int = 0
    threads: int = 1
    eval_n: int = 256
    eval_seed: int = 12345
    head_l1: float = 0.0
    pos_embed: Literal["learned", "sinusoidal"] = "learned"
    head_l1_from: float = 0.0
    head_l1_until: float = 1.0
    task_args: dict[str, Any] = field(default_factory=dict)

    def model_config(self) -> dict[str, Any]:
        """The ``TransformerBridgeConfig`` dict stored as the checkpoint's ``config.json``."""
        cfg: dict[str, Any] = {
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "d_head": self.d_head,
            "n_ctx": self.n_ctx,
            "d_vocab": self.d_vocab,
            "act_fn": "gelu",
            "normalization_type": "LN",
            "attn_only": self.d_mlp is None,
            "seed": self.seed,
        }
        if self.d_mlp is not None:
            cfg["d_mlp"] = self.d_mlp
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FACTS_WORLD = {"n_subjects": 256, "subject_len": [2, 3], "n_relations": 4, "n_attributes": 32,
                "world_seed": 7}  # fmt: skip

_FACTS = Recipe(
    name="facts",
    task="facts",
    description="memorised synthetic facts: multi-token subject + relation -> attribute",
    mechanism=(
        "1,024 random facts over 256 subjects of 2-3 shared tokens: only the whole subject "
        "fixes the attribute, so the model must combine subject tokens (attention) and look "
        "the attribute up in a memory (MLPs)."
    ),
    n_layers=2,
    d_model=128,
    n_heads=4,
    d_head=32,
    d_mlp=512,
    n_ctx=8,
    d_vocab=64,
    steps=3000,
    batch_size=256,
    lr=2e-3,
    weight_decay=0.0,
    task_args=dict(_FACTS_WORLD),
)
#: The attention-only control: the same facts, world and training, no MLPs.
_FACTS_ATTN = replace(
    _FACTS,
    name="facts-attn",
    description="attention-only control for zoo:facts (same facts, no MLPs)",
    mechanism=(
        "The same facts as zoo:facts in a model without MLPs: whatever it recalls lives in "
        "attention and embeddings, so causal tracing must show no MLP effect."
    ),
    d_mlp=None,
    task_args=dict(_FACTS_WORLD),
)

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe(
            name="induction",
            task="induction",
            description="2-layer attention-only; previous-token heads (L0) feed induction heads (L1)",
            mechanism=(
                "A layer-0 previous-token head writes 'my previous token was A' into each position; "
                "a layer-1 induction head at a later A matches it (K-composition) and copies the token "
                "that followed the earlier A. Segments of random length repeat at random places in "
                "random tokens, so neither position nor n-gram statistics predict the copy."
            ),
            n_layers=2,
            d_model=64,
            n_heads=4,
            d_head=16,
            d_mlp=None,
            n_ctx=96,
            d_vocab=256,
            steps=6000,
            batch_size=32,
            lr=1e-3,
            task_args={"seq_len": 64, "min_repeat": 5, "max_repeat": 30, "eval_repeat": 20},
        ),
        Recipe(
            name="retrieval",
            task="retrieval",
            description=(
                "needle-in-a-haystack key->value lookup in 256-token contexts: one key-tagging "
                "head, two copy (retrieval) heads, the other 13 heads pruned to zero"
            ),
            mechanism=(
                "Key/value pairs with distinct random keys sit at random depths in random filler; "
                "the query repeats one key and the answer is the value that followed it. A "
                "layer-0 head attends from each value to the key right before it (a local head: "
                "it tags the value with its key); layer-1 copy (retrieval) heads attend from the "
                "query key to the value so tagged and copy it. The first third of training is "
                "induction rows (the same mechanism, dense signal); positions are fixed "
                "sinusoids, so the local head works at every depth; a group lasso on heads "
                "(steps 40-80%) prunes every head the mechanism does not need to exactly zero."
            ),
            n_layers=2,
            d_model=64,
            n_heads=8,
            d_head=16,
            d_mlp=None,
            n_ctx=288,
            d_vocab=256,
            steps=4800,
            batch_size=16,
            lr=1e-3,
            pos_embed="sinusoidal",
            head_l1=20.0,
            head_l1_from=0.4,
            head_l1_until=0.8,
            task_args={
                "induction_frac": 1 / 3,
                "induction_batch": 32,
                "min_len": 96,
                "max_len": 288,
                "n_queries": 12,
                "max_pairs": 24,
                "single_frac": 0.5,
                "max_distractors": 8,
                "p_first": 0.1,
                "p_last": 0.25,
                "eval_len": 256,
            },
        ),  # fmt: skip
        _FACTS,
        _FACTS_ATTN,
        Recipe(
            name="ioi",
            task="ioi",
            description="indirect-object identification over a 24-name vocabulary",
            mechanism=(
                "'When A and B went to the PLACE, B gave a OBJ to' -> A. Names are random, both "
                "orders (ABBA/BABA) occur and filler shifts every position in training, so the "
                "model must find the name that is not repeated: detect the duplicated subject and "
                "move the other name to the end."
            ),
            n_layers=3,
            d_model=64,
            n_heads=4,
            d_head=16,
            d_mlp=None,
            n_ctx=32,
            d_vocab=64,
            steps=3000,
            batch_size=128,
            lr=1e-3,
            task_args={"n_names": 24, "n_fill": 3},
        ),
    ]
}
