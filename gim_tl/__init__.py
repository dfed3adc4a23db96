"""gim_tl: GIM (Gradient Interaction Modifications) gradients for TransformerLens models.

``GIMHookSet`` turns every gradient a TL user computes into a GIM gradient (Edin et al. 2025,
arXiv 2505.17630): TSG at T = 2, frozen norm statistics, and gradient normalization. On top of it:
token attributions (:mod:`gim_tl.attribution`), attribution patching and EAP
(:mod:`gim_tl.patching`), faithfulness metrics (:mod:`gim_tl.evaluation`) and the attention
self-repair analysis (:mod:`gim_tl.self_repair`).
"""

from gim_tl.attribution import TokenAttribution, attribute_tokens, compare
from gim_tl.circuits import Circuit, FaithfulnessCurve, faithfulness_curve
from gim_tl.config import PRESET_LABELS, PRESETS, GIMConfig, preset
from gim_tl.hookset import GIMHookSet, GIMReport, GIMRuleError, RuleStatus
from gim_tl.layout import GIMModelError
from gim_tl.models import load_model
from gim_tl.patching import activation_patching, atp, eap, logit_diff_metric
from gim_tl.stacking import GIMStackingError

__all__ = [
    "Circuit", "FaithfulnessCurve", "GIMConfig", "GIMHookSet", "GIMModelError", "GIMReport", "GIMRuleError",
    "GIMStackingError", "PRESETS", "PRESET_LABELS", "RuleStatus", "TokenAttribution", "activation_patching", "atp",
    "attribute_tokens", "compare", "eap", "faithfulness_curve", "load_model", "logit_diff_metric", "preset",
]
__version__ = "0.1.0"
