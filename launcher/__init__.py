"""
Launcher
========

Starting swarms. ``launcher.local`` runs a whole swarm on one machine (``checkfree swarm``): every stage
peer and spare as its own process, a failure injector (SIGKILL / SIGSTOP) and spare arrivals, a live
status line, and the merged report (``launcher.report``). ``launcher.static`` runs the same stage
workers on a fixed process group with the fault-tolerance machinery off (the benchmarks' baseline).
Peers on other hosts are started by hand with ``checkfree peer``; launching on cloud or spot instances
is not built yet.
"""
