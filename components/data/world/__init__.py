"""The synthetic shop world: a deterministic catalog, images, queries and click log.

Entry point: ``generate_world(cfg, out_dir)`` writes the data contract and returns a WorldSummary.
"""

from components.data.world.generate import WorldSummary, generate_world

__all__ = ["WorldSummary", "generate_world"]
