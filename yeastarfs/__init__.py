"""yeastarfs: a Yeastar PBX's call recordings (S-Series and P-Series) as a read-only filesystem."""

__version__ = "0.1.0"
