"""Jasper core: wire codec, dedup, release schedule, planner, metrics; pure logic, no I/O."""

__version__ = "0.1.0"
