"""Inverted lists bigger than RAM: IVF shards merged into one ``faiss.ivfdata`` file, memory-mapped at search time.

Workers (or the driver, chunk by chunk) fill copies of the trained IVF index and write each as a shard file; the
merge (faiss ``contrib.ondisk.merge_ondisk``: the shards are memory-mapped, their lists copied into
``OnDiskInvertedLists``) never loads the lists. The index file keeps the absolute path faiss recorded, so it is
read with ``IO_FLAG_ONDISK_SAME_DIR`` (:func:`attnpipe.index.faiss_index.read_index`): the ``.ivfdata`` is looked
up beside the index file, and a version directory can be moved, copied or downloaded anywhere.

Example::

    index = merge(trained, ["stage/shard-0.index", "stage/shard-1.index"], "stage", "faiss.ivfdata")
    faiss.write_index(index, "stage/faiss.index")      # + stage/faiss.ivfdata; shard files removed
"""

from __future__ import annotations

import os

import faiss

IVFDATA = "faiss.ivfdata"


def merge(trained: faiss.Index, shard_files: list[str], stage: str, ivfdata: str = IVFDATA) -> faiss.Index:
    """An empty trained IVF index + shard index files -> one index whose lists live in ``stage/ivfdata``.

    The shard files are deleted after the merge (they are the build's scratch, inside the staging directory).
    """
    from faiss.contrib.ondisk import merge_ondisk

    index = faiss.clone_index(trained)
    index.reset()
    if shard_files:
        merge_ondisk(index, shard_files, os.path.join(stage, ivfdata))
    else:  # no vectors: still an on-disk index, with an empty data file
        ivf = faiss.extract_index_ivf(index)
        lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, os.path.join(stage, ivfdata))
        ivf.replace_invlists(lists, True)
        lists.this.disown()  # type: ignore[attr-defined]  # SWIG: the index owns the lists now
    for f in shard_files:
        os.remove(f)
    return index


def is_ondisk(index: faiss.Index) -> bool:
    try:
        lists = faiss.extract_index_ivf(index).invlists
    except RuntimeError:
        return False
    return lists is not None and isinstance(faiss.downcast_InvertedLists(lists), faiss.OnDiskInvertedLists)
