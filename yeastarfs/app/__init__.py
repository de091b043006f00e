"""The command-line application: argument parsing, the mount's composition root, the
tools that work on a running mount, and the demo. Nothing below ``app`` imports it."""
