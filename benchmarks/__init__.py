"""ntkfast benchmarks: each suite times ntkfast against the plain-PyTorch peer a user would write.

Run ``python -m benchmarks.run_all --device cpu`` from the repository root; see benchmarks/README.md.
"""
