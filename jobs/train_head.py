"""`ray job submit --working-dir . -- python jobs/train_head.py --input ... --out head.safetensors`: fit a pooling head.

Same code path as `attnpipe train`; with `--set train.workers=N` it runs Ray Train workers on the job's cluster
(joined through RAY_ADDRESS), one per GPU when the cluster has GPUs.
"""

import sys

from attnpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--json", *sys.argv[1:]]))  # the summary ends the job log
