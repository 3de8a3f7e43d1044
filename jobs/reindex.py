"""`ray job submit --working-dir . -- python jobs/reindex.py --input ... --embeddings ... --index ...`: scheduled re-indexing.

Same code path as `attnpipe reindex`; under `ray job submit` it joins the job's cluster through RAY_ADDRESS. Prints
one JSON summary line on stdout (see README, "Scheduled re-indexing").
"""

import sys

from attnpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["reindex", "--json", *sys.argv[1:]]))  # the summary ends the job log
