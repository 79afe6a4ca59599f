"""Benchmarks: each bench_*.py module is a program that prints one JSON document on stdout."""

import os

# The one cluster every cluster benchmark uses: the Makefile's CLUSTER_NAME, `make dev`'s and `make
# cluster`'s too. A machine has one real node and it serves one cluster, so two names would stop `make bench`.
CLUSTER_NAME = os.environ.get("AGENTBOX_CLUSTER_NAME", "agentbox")
