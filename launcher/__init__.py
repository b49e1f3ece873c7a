"""
Launcher
========

Starting swarms: local multi-process swarms, peers on remote hosts and spot instances, and the failure
injector that kills peers. Environment variables are read here and nowhere else.

Not built yet: the multi-process runtime (``checkfree swarm`` / ``peer`` / ``status``) is the next
piece of work; today every run goes through the single-process engine (``checkfree train``).
"""
