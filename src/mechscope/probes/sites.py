"""The site vocabulary: what the tracer can capture, and the hook each site reads.

A *site* is a kind of activation, one per layer. Shapes are those TransformerLens 4.3's
``TransformerBridge`` emits (checked against the literal hook names in the tests, on a tiny
native model, a tiny Hugging Face Llama with grouped-query attention, and SmolLM2):

=========== =================================== ========================================
site        hook (layer ``l``)                  shape of one captured tensor
=========== =================================== ========================================
heads       ``blocks.l.attn.hook_z``            [batch, pos, head, d_head]
head_resid  ``blocks.l.attn.hook_z`` @ ``W_O``  [batch, pos, head, d_model] (computed)
patterns    ``blocks.l.attn.hook_pattern``      [batch, head, query, key]
attn_scores ``blocks.l.attn.hook_attn_scores``  [batch, head, query, key]
q           ``blocks.l.attn.hook_q``            [batch, pos, head, d_head]
k           ``blocks.l.attn.hook_k``            [batch, pos, kv_head, d_head]
v           ``blocks.l.attn.hook_v``            [batch, pos, kv_head, d_head]
ffn_pre     ``blocks.l.mlp.hook_pre``           [batch, pos, d_mlp]
ffn         ``blocks.l.mlp.hook_post``          [batch, pos, d_mlp]
resid_pre   ``blocks.l.hook_resid_pre``         [batch, pos, d_model]
resid_mid   ``blocks.l.hook_resid_mid``         [batch, pos, d_model] (models with MLPs)
resid       ``blocks.l.hook_resid_post``        [batch, pos, d_model]
attn_out    ``blocks.l.hook_attn_out``          [batch, pos, d_model]
mlp_out     ``blocks.l.hook_mlp_out``           [batch, pos, d_model]
=========== =================================== ========================================

Notes on the attention sites:

- ``kv_head`` has ``n_key_value_heads`` entries (3 on SmolLM2, whose 9 query heads share them);
  the bridge emits k and v *un-repeated* and mechscope keeps them so. Query head ``h`` reads kv
  head ``h // (n_heads // n_kv_heads)`` (``repeat_interleave`` grouping, as HF Llama's
  ``repeat_kv``). A ``heads=`` restriction indexes query heads; k and v are restricted with
  ``kv_heads=`` instead (see :class:`mechscope.probes.TraceConfig`). On a model without GQA
  ``kv_head`` is the ``head`` axis.
- ``q`` and ``k`` are taken *before* rotary embeddings on rotary models (TransformerLens's
  ``hook_q``/``hook_k``; the rotated ones are ``hook_rot_q``/``hook_rot_k``).
- ``attn_scores`` are pre-softmax, scaled (``q·kᵀ / sqrt(d_head)`` with the rotated q and k) and
  already masked: a masked entry (a future key, or a padding key) holds the bridge's mask value
  (``torch.finfo(dtype).min`` for HF models), so ``softmax(attn_scores) == patterns``. On the
  bridge's generic attention (native/zoo models) TransformerLens fires ``hook_attn_scores`` with
  the post-softmax pattern, so the tracer refuses the site there.

Writing ``resid_mid`` (an intervention, or patching it) changes only what the MLP reads: on the
TransformerLens 4.3 bridge ``hook_resid_mid`` is the input of the second LayerNorm
(``ln2.hook_in``), and the skip connection around the MLP carries the unpatched value, so after
the block ``resid == resid_mid (unpatched) + mlp_out (of the patched input)``. TransformerLens's
own ``patching.get_act_patch_resid_mid`` on the bridge does the same. To change the residual
stream itself, write ``attn_out`` (same layer) or ``resid_pre`` of the next layer.

A captured tensor is stored under its *key* ``"<site>.<layer>"`` (``"heads.3"``).

>>> hook_for("heads", 3)
'blocks.3.attn.hook_z'
>>> parse_sites("heads,patterns")
('heads', 'patterns')
>>> SITE_SPECS["k"].head_axis, SITE_SPECS["k"].kv, SITE_SPECS["patterns"].pos_axes
(2, True, (2,))
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from mechscope.errors import HookNameError, InputError
from mechscope.types import Model

Site = Literal[
    "heads", "head_resid", "patterns", "attn_scores", "q", "k", "v", "ffn_pre", "ffn",
    "resid_pre", "resid", "attn_out", "mlp_out", "resid_mid",
]  # fmt: skip
SITES: tuple[str, ...] = get_args(Site)

#: Axis names a site's tensor may have (the vocabulary of the site table).
Axis = Literal["batch", "pos", "query", "key", "head", "kv_head", "d_head", "d_model", "d_mlp"]


@dataclass(frozen=True)
class SiteSpec:
    """How a site is read: its hook template and the names of its axes, in order."""

    hook: str
    dims: tuple[Axis, ...]
    needs_mlp: bool = False

    @property
    def head_axis(self) -> int | None:
        """Axis of ``head`` (or ``kv_head``) in the captured tensor, if any."""
        for name in ("head", "kv_head"):
            if name in self.dims:
                return self.dims.index(name)
        return None

    @property
    def kv(self) -> bool:
        """Whether the head axis counts key/value heads (``n_key_value_heads``)."""
        return "kv_head" in self.dims

    @property
    def pos_axes(self) -> tuple[int, ...]:
        """Axes indexed by the token position a ``positions=`` restriction selects."""
        return tuple(i for i, d in enumerate(self.dims) if d in ("pos", "query"))

    @property
    def key_axes(self) -> tuple[int, ...]:
        """Axes that always span the whole (padded) sequence: the keys of a pattern."""
        return tuple(i for i, d in enumerate(self.dims) if d == "key")


_HEADS: tuple[Axis, ...] = ("batch", "pos", "head", "d_head")
_KV: tuple[Axis, ...] = ("batch", "pos", "kv_head", "d_head")
_QK: tuple[Axis, ...] = ("batch", "head", "query", "key")
_RESID: tuple[Axis, ...] = ("batch", "pos", "d_model")
_MLP: tuple[Axis, ...] = ("batch", "pos", "d_mlp")

SITE_SPECS: dict[str, SiteSpec] = {
    "heads": SiteSpec("blocks.{layer}.attn.hook_z", _HEADS),
    "head_resid": SiteSpec("blocks.{layer}.attn.hook_z", ("batch", "pos", "head", "d_model")),
    "patterns": SiteSpec("blocks.{layer}.attn.hook_pattern", _QK),
    "attn_scores": SiteSpec("blocks.{layer}.attn.hook_attn_scores", _QK),
    "q": SiteSpec("blocks.{layer}.attn.hook_q", _HEADS),
    "k": SiteSpec("blocks.{layer}.attn.hook_k", _KV),
    "v": SiteSpec("blocks.{layer}.attn.hook_v", _KV),
    "ffn_pre": SiteSpec("blocks.{layer}.mlp.hook_pre", _MLP, needs_mlp=True),
    "ffn": SiteSpec("blocks.{layer}.mlp.hook_post", _MLP, needs_mlp=True),
    "resid_pre": SiteSpec("blocks.{layer}.hook_resid_pre", _RESID),
    "resid": SiteSpec("blocks.{layer}.hook_resid_post", _RESID),
    "resid_mid": SiteSpec("blocks.{layer}.hook_resid_mid", _RESID, needs_mlp=True),
    "attn_out": SiteSpec("blocks.{layer}.hook_attn_out", _RESID),
    "mlp_out": SiteSpec("blocks.{layer}.hook_mlp_out", _RESID, needs_mlp=True),
}


def hook_for(site: str, layer: int) -> str:
    """The hook name a site reads at ``layer``."""
    return SITE_SPECS[check_site(site)].hook.format(layer=layer)


def key_for(site: str, layer: int) -> str:
    """The key a captured tensor is stored under."""
    return f"{site}.{layer}"


def split_key(key: str) -> tuple[str, int]:
    """``"heads.3"`` -> ``("heads", 3)``."""
    site, _, layer = key.rpartition(".")
    return site, int(layer)


def check_site(site: str) -> str:
    if site not in SITE_SPECS:
        raise HookNameError(
            f"unknown site {site!r}; choose from {', '.join(SITES)} "
            "(for any other hook point, attach a function with "
            "mechscope.probes.hooks.hooked(model, [(hook_name, fn)]))"
        )
    return site


def parse_sites(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Parse ``"heads,patterns"`` (or a sequence) into checked site names, in order, unique."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for item in (i.strip() for i in items):
        if item and check_site(item) not in out:
            out.append(item)
    if not out:
        raise HookNameError(f"no site given; choose from {', '.join(SITES)}")
    return tuple(out)


def _fires_real_scores(attn: Any) -> bool:
    """Whether this attention bridge fires ``hook_attn_scores`` with pre-softmax scores.

    TransformerLens 4.3's generic ``AttentionBridge.forward`` (native/zoo models) fires it post
    hoc with the module's second output, the post-softmax pattern; the bridges that compute the
    attention themselves (HF Llama, GPT-2, BERT, ...) override ``forward`` and fire real scores.
    """
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    return type(attn).forward is not AttentionBridge.forward or bool(
        getattr(attn, "requires_relative_position_bias", False))


def check_site_on_model(model: Model, site: str, layers: Iterable[int]) -> None:
    """Raise an :class:`InputError`-family error when ``model`` cannot give ``site`` at ``layers``:
    an MLP site on an attention-only model, or ``attn_scores`` where the bridge does not fire real
    scores. Used by the tracer (reading) and by interventions (writing) alike."""
    check_site(site)
    if SITE_SPECS[site].needs_mlp and getattr(model.cfg, "attn_only", False):
        raise HookNameError(f"site {site!r} needs MLPs, but this model is attention-only")
    if site == "attn_scores" and not all(_fires_real_scores(model.blocks[layer].attn)
                                         for layer in layers):
        raise InputError(
            "site 'attn_scores' is not available on this model: its TransformerLens attention "
            "bridge (the generic AttentionBridge of native/zoo models) fires hook_attn_scores "
            "with the post-softmax pattern, not the scores. Use 'q' and 'k' instead "
            "(scores = q·kᵀ / sqrt(d_head), kv head h // group) or 'patterns'"
        )
