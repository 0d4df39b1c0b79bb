"""The DiT's ``layer_forward`` hook, which lean layers and the step cache each wrap."""
from __future__ import annotations


def replace_layer_forward(dit, expected, new) -> None:
    """Put ``new`` where ``expected`` is the layer hook: in the model's and in its transformer's hook table.

    sat keeps a hook table on the model and a copy on its transformer; both
    must point at the same callable, or the transformer runs the stale one.
    """
    for hooks in (dit.hooks, getattr(getattr(dit, "transformer", None), "hooks", None)):
        if isinstance(hooks, dict) and hooks.get("layer_forward") is expected:
            hooks["layer_forward"] = new
