"""`ray job submit --working-dir . -- python jobs/encode.py --input ... --out ...`: the encode stage as a Ray job.

Same code path as `attnpipe encode`; under `ray job submit` it joins the job's cluster through RAY_ADDRESS.
"""

import sys

from attnpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["encode", "--json", *sys.argv[1:]]))  # the summary ends the job log
