"""Everything that speaks to a Yeastar S-Series PBX (API v2.0.0, yeastar-api.md)."""
