"""`ray job submit --working-dir . -- python jobs/pipeline.py [--config FILE]`: the whole pipeline (`attnpipe run`)."""

import sys

from attnpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "--json", *sys.argv[1:]]))  # the summary ends the job log
