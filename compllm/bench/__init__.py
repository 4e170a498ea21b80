"""Benchmarks as configs: items with gold answers, systems that answer them, a resumable runner, scoring."""
