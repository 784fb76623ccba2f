"""Speed and memory benchmarks: `python -m benchmarks` prints every figure and rewrites BENCHMARKS.md.

Nothing here is imported by the service. Figures are measured on the machine that runs the command and are
never asserted by tests (tests/test_benchmarks_smoke.py only runs the code paths at tiny sizes).
"""
