"""`ray job submit --working-dir . -- python jobs/verify.py PATH [--clean]`: the integrity check as a Ray job.

Same code path as `attnpipe verify`: every part or index file hashed in full; leftovers of killed runs listed (and
removed with --clean). Exits 1 when something is damaged.
"""

import sys

from attnpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["verify", "--json", *sys.argv[1:]]))
