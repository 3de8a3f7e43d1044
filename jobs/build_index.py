"""`ray job submit --working-dir . -- python jobs/build_index.py --embeddings DIR --out ROOT [...]`.

Same code path as `attnpipe index`; under `ray job submit` it joins the job's cluster through RAY_ADDRESS.
"""

import sys

from attnpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", "--json", *sys.argv[1:]]))  # the summary ends the job log
