"""tokenrelay's benchmarks: ``python -m benchmarks [--quick] [--json PATH]``."""
