"""checkfree: pipeline-parallel LLM training that rebuilds lost stages without checkpoints."""

__version__ = "0.2.0"  # 0.2: seeds mixed by blake2b (runs of 0.1 draw other data, inits and failures)
