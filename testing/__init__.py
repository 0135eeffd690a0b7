"""Testing helpers shared by `tests/`, `benchmarks/` and the demo: synthetic data and stand-in models. Not part of
the product packages (`viscpm`, `pipelines`)."""
