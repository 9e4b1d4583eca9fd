"""Per-layer rules behind a registry: one file per layer family.

Adding a layer type the existing operators cover takes one new file here (a ``LayerRule``
subclass decorated with ``@register(ModuleType)``) and one import line below; another library's
module type can be named by its qualified name (``@register("transformers.pytorch_utils.Conv1D")``)
so that library is never imported. Modules with no rule that own trainable parameters take the
exact generic route (``generic.GENERIC``). A weight shared by an Embedding and a Linear is
combined in ``tied``.
"""

from .base import LayerRule, RoutePlan, RuleError, register, registered_types, rule_for
# Imported for their registrations.
from . import linear, bilinear, conv, embedding, norm, activation, attention, recurrent  # noqa: F401
from .generic import GENERIC, GenericRule

__all__ = ["LayerRule", "RoutePlan", "RuleError", "register", "registered_types", "rule_for",
           "GENERIC", "GenericRule"]
