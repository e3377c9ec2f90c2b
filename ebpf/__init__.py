"""Kernel fast path of Jasper: eBPF programs (C, in this folder), their build and their loader."""
