"""apt-dense: Adaptive Patch Transformers for dense prediction (detection, segmentation)."""
from .attention import available_backends, packed_attention
from .dense_map import tokens_to_dense
from .embedding import AdaptivePatchEmbed
from .layout import PackedSequences, PatchLayout, build_layout
from .model import APTOutput, APTViT, TokenStats
from .schedule import PatchSchedule, select_levels, thresholds_from_sequence
from .scoring import EntropyScorer, LaplacianScorer, UpsampleMSEScorer, build_scorer, to_intensity

__version__ = "0.1.0"

__all__ = [
    "APTViT",
    "APTOutput",
    "TokenStats",
    "AdaptivePatchEmbed",
    "PatchSchedule",
    "PatchLayout",
    "PackedSequences",
    "EntropyScorer",
    "LaplacianScorer",
    "UpsampleMSEScorer",
    "available_backends",
    "build_layout",
    "build_scorer",
    "packed_attention",
    "select_levels",
    "thresholds_from_sequence",
    "to_intensity",
    "tokens_to_dense",
]
