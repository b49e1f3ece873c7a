"""The shared core: everything both executors use and that runs no process (model, data, schedules,
failure traces, recovery plans and the one rebuild path, checkpoint payloads, per-stage step helpers,
seeding, the event schema and the metric writers). It imports nothing from ``checkfree.engine``,
``checkfree.swarm`` or ``launcher``."""
