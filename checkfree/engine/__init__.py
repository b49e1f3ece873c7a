"""The single-process executor: every stage in one process (``pipeline.PipelineEngine``), its training
loop (``trainer.Trainer``) with its recovery (``recovery``), saves (``saving``) and records (``records``),
the engine's shadows for redundant computation and the progress bar. It imports ``checkfree.core`` and the
config, never ``checkfree.swarm``."""
