"""
Strategy names
==============

The names of the recovery strategies and of their options, without torch: the command line's help, the
configs and the analysis code read them without loading the model code. ``checkfree.core.recovery`` says
what each one does.
"""

STRATEGIES = ("none", "checkfree", "checkfree_plus", "copy", "uniform", "random", "checkpoint", "redundant", "hybrid")
FALLBACKS = ("checkpoint", "nearest", "random")
SWAPPED = ("checkfree_plus", "hybrid")  # strategies whose pipeline swaps by default (pipeline.swap unset)
NORM_SOURCES = ("raw", "smoothed", "post_clip")
NORM_SCOPES = ("blocks", "stage")
PARTNER_RULES = ("average", "copy")
OPTIMIZER_INITS = ("fresh", "neighbours")
PER_STAGE_STRATEGIES = (
    "checkfree",
    "checkfree_plus",
    "copy",
    "uniform",
    "random",
    "hybrid",
)  # rebuild a stage from others
