"""Seeded task generators for the demo and the experiment: math word problems and code-from-examples."""
