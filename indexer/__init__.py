"""clipdex indexer: scan -> plan -> decode -> embed and write, incrementally, into a store."""

from indexer.plan import Job, Plan, make_plan
from indexer.run import IndexConfig, IndexSummary, index_paths
from indexer.scanner import Scan, scan

__all__ = ["IndexConfig", "IndexSummary", "Job", "Plan", "Scan", "index_paths", "make_plan", "scan"]
