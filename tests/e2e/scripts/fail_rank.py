"""Launcher e2e helper: rank 1 exits with status 3, the other ranks exit cleanly without waiting."""
import os
import sys

if __name__ == "__main__":
    if os.environ["RANK"] == "1":
        print("rank 1 failing on purpose", file=sys.stderr)
        sys.exit(3)
