"""Benchmark scripts (run as ``python benchmarks/<script>.py``), their results, and the
long-tailed data-set builders (:mod:`benchmarks.datasets`). Not installed with the package;
a package only so that tests can import ``benchmarks.datasets`` from the repository root."""
