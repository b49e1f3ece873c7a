"""checkfree: pipeline-parallel LLM training that rebuilds lost stages without checkpoints."""

__version__ = "0.1.0"
