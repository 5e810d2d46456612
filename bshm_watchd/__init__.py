"""bshm-watchd: hot-folder human matting for scanned photographs."""

__version__ = "0.1.0"

#: Bumped whenever a change alters the pixels we write; part of the ledger key.
PIPELINE_VERSION = "1"
