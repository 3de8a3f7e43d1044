"""`ray job submit --working-dir . -- python jobs/dedup.py --embeddings DIR --out DIR [--against DIR ...] [...]`.

Same code path as `attnpipe dedup` (pairs, groups, leakage, summary.json, report.html).
"""

import sys

from attnpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["dedup", *sys.argv[1:]]))
