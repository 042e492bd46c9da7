"""Benchmark harness: DeltaDeno's cost against img2img and DiffEdit on the same components."""
