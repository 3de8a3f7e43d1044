"""The embeddings dataset's one owner: schema, manifest, parts, checksums, readers, runs and commits.

A dataset is ``DIR/_manifest.json`` (the commit point) + the ``part-*.parquet`` files it lists + ``_config.yaml``,
on a local disk or an object store (see :mod:`attnpipe.store.writer` for the commit protocol and
:mod:`attnpipe.store.dataset` for verified reading). Small output directories (eval, dedup) are published by
:mod:`attnpipe.store.outputs`.

Example::

    ds = store.open_dataset("emb/")                     # manifest read and checked once
    ids, X = store.part_vectors(ds.path, ds.parts()[0])  # one part's ok rows, checksum verified
    ids, X = store.load_vectors("emb/")                 # the whole dataset (small data)
"""

from attnpipe.fs import sha256_file, write_json
from attnpipe.store.dataset import (
    CONFIG_FILE,
    MANIFEST,
    DamagedData,
    Dataset,
    Part,
    damaged_parts,
    dataset_metadata,
    embedding_matrix,
    iter_parts,
    load_vectors,
    number_parts,
    open_dataset,
    part_numbers,
    part_vectors,
    read_embeddings,
    read_manifest,
    read_part,
)
from attnpipe.store.outputs import NotOurs, publish, staging_dir
from attnpipe.store.schema import SCHEMA_VERSION, fixed_list, schema
from attnpipe.store.writer import (
    Run,
    RunMismatch,
    clean_dataset,
    commit,
    start_run,
    unfinished_runs,
    write_part,
    write_vectors,
)

__all__ = [
    "CONFIG_FILE",
    "MANIFEST",
    "SCHEMA_VERSION",
    "DamagedData",
    "Dataset",
    "NotOurs",
    "Part",
    "Run",
    "RunMismatch",
    "clean_dataset",
    "commit",
    "damaged_parts",
    "dataset_metadata",
    "embedding_matrix",
    "fixed_list",
    "iter_parts",
    "load_vectors",
    "number_parts",
    "open_dataset",
    "part_numbers",
    "part_vectors",
    "publish",
    "read_embeddings",
    "read_manifest",
    "read_part",
    "schema",
    "sha256_file",
    "staging_dir",
    "start_run",
    "unfinished_runs",
    "write_json",
    "write_part",
    "write_vectors",
]
