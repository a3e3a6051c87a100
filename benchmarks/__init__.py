"""Benchmarks: scripts that measure, print a markdown table and write numbers and a plot."""
