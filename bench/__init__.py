"""Benchmarks, the soak and the reference-table check: tools run by hand (`pymk bench ...`, `pymk soak`,
`python -m pymk.bench.<module>`), never imported by the workers."""
