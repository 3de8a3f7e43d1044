"""`ray job submit --working-dir . -- python jobs/evaluate.py --embeddings DIR --index ROOT --out DIR [...]`.

Same code path as `attnpipe eval` (metrics.json + report.html).
"""

import sys

from attnpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "--json", *sys.argv[1:]]))  # the summary ends the job log
