"""The PBX seam: what the rest of yeastarfs needs from a PBX, whatever its family."""
