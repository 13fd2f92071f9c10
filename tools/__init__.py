"""Scripts around the library, run from the repository root as `python -m tools.NAME`: bench
(speed vs the reference implementation), params (parameter counts), report (the README's
results from run directories), gpu_check (the prepared check for a lent GPU)."""
