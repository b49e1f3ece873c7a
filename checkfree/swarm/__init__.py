"""The multi-process executor: one peer per stage, membership on a hivemind DHT, the coordinator's pure
rules, the transport over torch.distributed, the stage worker, and the peer split into its jobs
(``peer`` lifecycle and heartbeat, ``leader``, ``handover`` of weights, ``training`` loop). It imports
``checkfree.core`` and the config, never ``checkfree.engine`` or ``launcher``."""
