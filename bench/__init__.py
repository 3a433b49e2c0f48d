"""Benchmarks: the model (``python -m bench.model_bench``) and the HTTP service
(``python -m bench.service_bench``); see docs/benchmarks.md. Not part of the installed package."""
