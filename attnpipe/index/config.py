"""Index settings (one frozen dataclass for build, update, reindex and the CLI) and the memory-budget planner.

``plan(n, dim, config)`` picks the faiss factory, nlist and in-memory vs on-disk inverted lists from the vector count,
the dimension and ``memory_budget``, as autofaiss does: the most accurate index whose search-time memory fits
(``Flat`` < ``IVF,Flat`` < ``IVF,PQ`` < ``OPQ+IVF,PQ`` in bytes per vector), and on-disk inverted lists
(``OnDiskInvertedLists``, memory-mapped at search time) when even the compressed codes do not fit.

Example::

    cfg = IndexConfig(lsh="none", memory_budget=parse_bytes("8GB"))
    plan(100_000_000, 512, cfg)   # {'factory': 'OPQ64,IVF65536,PQ64', 'ondisk': False, 'estimated_bytes': ...}
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

LSH_CHOICES = ("simhash", "minhash", "both", "none")
FLAT_MAX = 50_000  # exact search below this many vectors
FLAT_IVF_MAX = 2_000_000  # default rule without a budget: IVF,Flat below, IVF,PQ beyond
BUDGET_SHARE = 0.8  # of the budget for the index; the rest for queries, one part, the process


@dataclass(frozen=True)
class IndexConfig:
    """Everything that decides an index version. ``lsh=None`` / ``factory=None`` mean "the live version's choice,
    else the default" for updates, and the default for a build.

    Raises (on construction):
        ValueError: a bad LSH choice, target recall, threshold, growth, keep or budget.
    """

    factory: str | None = None
    lsh: str | None = None
    workers: int = 0  # 0: in this process for small data (Ray start-up dominates), one Ray task per CPU beyond
    target_recall: float = 0.95
    queries: int = 1000  # tuning queries (exact top-k vs the index)
    seed: int = 0
    simhash_tables: int = 16
    simhash_bits: int = 12
    minhash_perm: int = 128
    dedup_threshold: float = 0.9
    max_growth: float = 0.5
    keep: int = 3
    memory_budget: int | None = None  # bytes; None: the default factory rule, inverted lists in memory
    ondisk: bool | None = None  # None: decided by the budget

    def __post_init__(self) -> None:
        if self.lsh is not None and self.lsh not in LSH_CHOICES:
            raise ValueError(f"--lsh {self.lsh!r}; allowed: {', '.join(LSH_CHOICES)}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target recall must be in (0, 1], got {self.target_recall}")
        if not 0 < self.dedup_threshold <= 1:
            raise ValueError(f"dedup threshold must be in (0, 1], got {self.dedup_threshold}")
        if self.max_growth <= 0:
            raise ValueError(f"max growth must be > 0, got {self.max_growth}")
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1 version, got {self.keep}")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ValueError(f"memory budget must be positive, got {self.memory_budget}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")

    @property
    def lsh_choice(self) -> str:
        return self.lsh or "simhash"


_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30, "T": 2**40}
_UNITS["TB"] = 2**40


def parse_bytes(text: str | int) -> int:
    """``"8GB"``, ``"512M"``, ``"1.5G"`` or an int -> bytes (binary units: 1 GB = 2**30).

    Raises:
        ValueError: not a positive size.
    """
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?B?)\s*", str(text).upper())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--memory-budget expects a size such as 8GB, 512MB or 1.5G, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def nlist_for(n: int) -> int:
    """4·sqrt(n) rounded to a power of two, 16..65536."""
    return int(min(max(2 ** round(math.log2(4 * math.sqrt(max(n, 1)))), 16), 65536))


def _pq_m(dim: int, bytes_per_code: float) -> int | None:
    """The largest PQ sub-quantizer count m <= bytes_per_code dividing dim (8-bit codes: m bytes per vector)."""
    fits = [m for m in range(1, dim + 1) if dim % m == 0 and m <= bytes_per_code and m <= dim // 2]
    return max(fits) if fits else None


def estimate_bytes(factory: str, n: int, dim: int) -> int:
    """Search-time memory of an index built with ``factory`` over ``n`` vectors (codes + ids + coarse centroids)."""
    f = factory.upper()
    nlist = int(m.group(1)) if (m := re.search(r"IVF(\d+)", f)) else 0
    pq = re.search(r"PQ(\d+)", f)
    code = int(pq.group(1)) if pq else dim * 4
    ids = 8 if nlist or "FLAT" not in f else 0  # Flat without IVF is wrapped in IDMap2: ids + a reverse map
    extra = 8 * n if not nlist else 0
    return n * (code + ids) + extra + nlist * dim * 4 + (dim * dim * 4 if f.startswith("OPQ") else 0)


def plan(n: int, dim: int, config: IndexConfig) -> dict:
    """Factory, on-disk or not, and the estimated search memory for ``n`` vectors of ``dim`` (see the module doc)."""
    nlist = nlist_for(n)
    budget = config.memory_budget
    if config.factory:
        factory = config.factory
    elif budget is None:
        if n < FLAT_MAX:
            factory = "Flat"
        elif n < FLAT_IVF_MAX:
            factory = f"IVF{nlist},Flat"
        else:
            factory = f"IVF{nlist},PQ{_pq_m(dim, dim // 4)}"
    else:
        room = BUDGET_SHARE * budget
        per_vector = (room - nlist * dim * 4) / max(n, 1)  # bytes left per vector for its code and id
        if n < FLAT_MAX and estimate_bytes("Flat", n, dim) <= room:
            factory = "Flat"
        elif per_vector >= dim * 4 + 8:
            factory = f"IVF{nlist},Flat"
        elif (m := _pq_m(dim, min(per_vector - 8, dim // 4))) and m >= max(dim // 16, 8):
            factory = f"IVF{nlist},PQ{m}" if m * 4 >= dim // 2 else f"OPQ{m},IVF{nlist},PQ{m}"
        else:  # even compact codes do not fit: keep dim/4-byte codes on disk, memory-mapped at search time
            m = _pq_m(dim, dim // 4)
            factory = f"IVF{nlist},PQ{m}"
    estimated = estimate_bytes(factory, n, dim)
    is_ivf = "IVF" in factory.upper()
    if config.ondisk is not None:
        ondisk = config.ondisk and is_ivf
    else:
        ondisk = budget is not None and is_ivf and estimated > BUDGET_SHARE * budget
    resident = nlist * (dim * 4 + 64) if ondisk else estimated  # on disk: the quantizer and list offsets stay in RAM
    return {"factory": factory, "ondisk": bool(ondisk), "estimated_bytes": int(estimated), "resident_bytes": resident}
