"""Developer tools for the shardspeed repository (not part of the installed package)."""
