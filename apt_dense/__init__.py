"""apt-dense: Adaptive Patch Transformers for dense prediction (detection, segmentation)."""
from .attention import available_backends, packed_attention
from .dense_map import tokens_to_dense
from .embedding import AdaptivePatchEmbed
from .layout import ImagePrefix, PackedSequences, PatchLayout, PendingLayout
from .model import APTOutput, APTViT, TokenStats
from .planner import InputScaleWarning, TokenPlanner
from .schedule import PatchSchedule, select_levels, thresholds_from_sequence
from .scoring import EntropyScorer, LaplacianScorer, UpsampleMSEScorer, build_scorer, to_intensity

__version__ = "0.1.0"

__all__ = [
    "APTViT",
    "APTOutput",
    "TokenStats",
    "TokenPlanner",
    "InputScaleWarning",
    "AdaptivePatchEmbed",
    "PatchSchedule",
    "PatchLayout",
    "PendingLayout",
    "PackedSequences",
    "ImagePrefix",
    "EntropyScorer",
    "LaplacianScorer",
    "UpsampleMSEScorer",
    "available_backends",
    "build_scorer",
    "packed_attention",
    "select_levels",
    "thresholds_from_sequence",
    "to_intensity",
    "tokens_to_dense",
]
