"""Emulated cloud on one machine: network namespaces, scheduled faults, the run orchestrator."""
