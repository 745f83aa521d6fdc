"""What produces docs/*.json, outside the package users install: the step-time benchmark
(``tools/benchmark_ddp.py``), the guard's host work timed, the scale simulation
(``tools/scale_sim.py``) and the counting proxy for the c10d store it runs behind.

The tools put the repository root on ``sys.path`` to import it, and ``tests/conftest.py`` does once.
"""
