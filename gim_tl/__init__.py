"""gim_tl: GIM (Gradient Interaction Modifications) gradients for TransformerLens models.

``GIMHookSet`` turns every gradient a TL user computes into a GIM gradient (Edin et al. 2025,
arXiv 2505.17630): TSG at T = 2, frozen norm statistics, and gradient normalization.
"""

from gim_tl.config import PRESET_LABELS, PRESETS, GIMConfig, preset
from gim_tl.hookset import GIMHookSet, GIMReport, GIMRuleError, RuleStatus
from gim_tl.layout import GIMModelError

__all__ = [
    "GIMConfig", "GIMHookSet", "GIMModelError", "GIMReport", "GIMRuleError", "PRESETS", "PRESET_LABELS",
    "RuleStatus", "preset",
]
__version__ = "0.1.0"
