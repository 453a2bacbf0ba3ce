"""The site vocabulary: what the tracer can capture, and the hook each site reads.

A *site* is a kind of activation, one per layer:

========== ================================== ==========================================
site        hook (layer ``l``)                 shape of one captured tensor
========== ================================== ==========================================
heads       ``blocks.l.attn.hook_z``           [batch, pos, head, d_head]
head_resid  ``blocks.l.attn.hook_z`` @ ``W_O`` [batch, pos, head, d_model] (computed on the fly)
patterns    ``blocks.l.attn.hook_pattern``     [batch, head, query, key]
ffn_pre     ``blocks.l.mlp.hook_pre``          [batch, pos, d_mlp]
ffn         ``blocks.l.mlp.hook_post``         [batch, pos, d_mlp]
resid_pre   ``blocks.l.hook_resid_pre``        [batch, pos, d_model]
resid       ``blocks.l.hook_resid_post``       [batch, pos, d_model]
attn_out    ``blocks.l.hook_attn_out``         [batch, pos, d_model]
mlp_out     ``blocks.l.hook_mlp_out``          [batch, pos, d_model]
========== ================================== ==========================================

A captured tensor is stored under its *key* ``"<site>.<layer>"`` (``"heads.3"``).

>>> hook_for("heads", 3)
'blocks.3.attn.hook_z'
>>> parse_sites("heads,patterns")
('heads', 'patterns')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from mechscope.errors import HookNameError

Site = Literal[
    "heads", "head_resid", "patterns", "ffn_pre", "ffn", "resid_pre", "resid", "attn_out", "mlp_out"
]
SITES: tuple[str, ...] = get_args(Site)


@dataclass(frozen=True)
class SiteSpec:
    """How a site is read: its hook template and which axes it has."""

    hook: str
    head_axis: int | None  # axis of ``head`` in the captured tensor, if any
    pos_axes: tuple[int, ...]  # axes indexed by token position
    needs_mlp: bool = False


SITE_SPECS: dict[str, SiteSpec] = {
    "heads": SiteSpec("blocks.{layer}.attn.hook_z", head_axis=2, pos_axes=(1,)),
    "head_resid": SiteSpec("blocks.{layer}.attn.hook_z", head_axis=2, pos_axes=(1,)),
    "patterns": SiteSpec("blocks.{layer}.attn.hook_pattern", head_axis=1, pos_axes=(2,)),
    "ffn_pre": SiteSpec("blocks.{layer}.mlp.hook_pre", None, (1,), needs_mlp=True),
    "ffn": SiteSpec("blocks.{layer}.mlp.hook_post", None, (1,), needs_mlp=True),
    "resid_pre": SiteSpec("blocks.{layer}.hook_resid_pre", None, (1,)),
    "resid": SiteSpec("blocks.{layer}.hook_resid_post", None, (1,)),
    "attn_out": SiteSpec("blocks.{layer}.hook_attn_out", None, (1,)),
    "mlp_out": SiteSpec("blocks.{layer}.hook_mlp_out", None, (1,), needs_mlp=True),
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
