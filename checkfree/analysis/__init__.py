"""
Analysis
========

What the benchmarks conclude from finished runs, kept apart from the executors (no module here is imported
by ``checkfree.core``, ``checkfree.engine`` or ``checkfree.swarm``):

- ``runs``: one reader of a run's metrics for both executors: the validation curve and the steps, seconds
  and iterations to a target loss;
- ``stats``: intervals (t on log ratios, BCa bootstrap), the Holm correction and the verdict rule;
- ``tables``: markdown tables through ``tabulate``;
- ``costmodel``: expected time to a target under stage failures, and the replay of a recorded run.
"""
