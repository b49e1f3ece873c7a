"""
Analysis
========

What the benchmarks conclude from finished runs, kept apart from the executors (no module here is imported
by ``checkfree.core``, ``checkfree.engine`` or ``checkfree.swarm``):

- ``runs``: one reader of a run's metrics for both executors: the validation curve and the steps, seconds
  and iterations to a target loss;
- ``stats``: intervals (t on log ratios, BCa bootstrap), the Holm correction and the verdict rule;
- ``tables``: markdown tables through ``tabulate``;
- ``reanalysis``: every reported comparison of the finished sweeps judged again by the rule of ``stats``;
- ``sweep_tables``: a convergence sweep's page, with the re-analysis's intervals and verdicts;
- ``benchmarks``: every benchmark's command as an argument list (run without a shell), and its provenance;
- ``costmodel``: expected time to a target under stage failures, and the replay of a recorded run;
- ``whatif`` (the map), ``validation`` (replay and validation of recorded runs), ``null_predictor`` (the model
  against each run's own step time), ``overlap_fit``, ``table2`` (the paper's Table 2): ``scripts/whatif.py``;
- ``calibration``: checkpoint intervals by Young's and Daly's rules from measured save and step times;
- ``q``: the extra steps a lost and rebuilt stage costs, read from ``scripts/measure_q.py``'s curves;
- ``swap_tax``: CheckFree+'s swapped schedule against the plain one without failures, and the expected time
  to target per swapped fraction that chooses ``pipeline.swap_fraction``;
- ``sweep``: a resumable runner of a sweep's trainings (one process each, finished runs skipped).
"""
