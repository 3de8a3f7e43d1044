"""The ``attnpipe`` command. Each sub-command parses, builds a config, and calls one library function.

attnpipe sample --out data/ --format tar --n 400
attnpipe encode --input data/ --out emb/ --set model.backbone=resnet50
attnpipe run                       # the demo: sample data -> encode -> index -> eval on a local Ray

Conventions: ``--json`` on every command prints one machine-readable summary line on stdout (the last line a job's
log ends with); without it, human lines go to stderr through the ``attnpipe`` logger (``-v`` more, ``-q`` less).
Command modules are imported inside the command functions, so ``attnpipe --help`` imports neither torch nor Ray.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from attnpipe import __version__, log, store
from attnpipe.config import ConfigError, load_config
from attnpipe.data.shards import InputError
from attnpipe.dedup.command import add_arguments as add_dedup_arguments
from attnpipe.dedup.command import run_command as run_dedup_command
from attnpipe.index.config import LSH_CHOICES
from attnpipe.index.layout import IndexLayoutError
from attnpipe.lock import LockHeld
from attnpipe.train.command import add_train_arguments, run_train_command

DEMO_DIR = "attnpipe-demo"  # = attnpipe.pipeline.DEMO_DIR (not imported: --help stays light)
MAX_K = 100_000  # search -k: more results than anyone reads; a typo like -k 10000000 fails fast
logger = log.get_logger("attnpipe.cli")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` where there is a meaningful default (not for required options, None or flags)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if not _shows_default(action) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _shows_default(action: argparse.Action) -> bool:
    d = action.default
    return not (action.required or action.nargs == 0 or d is None or d is False or d == [] or d is argparse.SUPPRESS)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (sections model/data/encode/train)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set model.backbone=resnet50 (repeatable)",
    )
    p.add_argument(
        "--ray-address", default=None, help="join this Ray cluster (default: $RAY_ADDRESS, else start a local Ray)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnpipe", description=__doc__.split("\n")[0], formatter_class=_HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"attnpipe {__version__}")
    _verbosity_args(parser, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="write a small synthetic labeled dataset (objects with known boxes)")
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="tar", choices=("folder", "tar", "parquet"))
    p.add_argument("--n", type=int, default=400, help="number of images")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--broken", action="store_true", help="add a shard of corrupt/empty/bomb members")

    p = sub.add_parser("encode", help="encode image shards into an embeddings dataset (Parquet)")
    p.add_argument("--input", nargs="+", required=True, help="shard files or directories (local or URI)")
    p.add_argument("--out", required=True, help="output dataset directory (published atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (or another run's leftovers)")
    p.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="start over instead of resuming an unfinished run of the same command in --out",
    )
    p.add_argument("--json", action="store_true", help="print the run summary as JSON on stdout")
    _config_args(p)

    p = sub.add_parser("verify", help="full integrity check of an embeddings dataset or index root; lists leftovers")
    p.add_argument("path", help="an embeddings dataset or an index root (local or URI)")
    p.add_argument("--clean", action="store_true", help="remove the leftovers of killed runs it lists")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")

    p = sub.add_parser("index", help="build a FAISS (+ LSH) index version of an embeddings dataset")
    p.add_argument("--embeddings", required=True, help="embeddings dataset written by `attnpipe encode`")
    p.add_argument("--out", required=True, help="index root: versions v<N>/ and CURRENT")
    p.add_argument("--faiss", default=None, help="faiss index_factory string (default: chosen from the count)")
    p.add_argument("--lsh", default="simhash", choices=LSH_CHOICES)
    p.add_argument("--workers", type=int, default=0, help="Ray add tasks (default: one per CPU, at most parts)")
    p.add_argument("--target-recall", type=float, default=0.95, help="recall@10 vs exact that nprobe is tuned to")
    p.add_argument(
        "--dedup-threshold",
        type=float,
        default=0.9,
        help="weighted Jaccard over which two images are near-duplicates (--lsh minhash|both)",
    )
    p.add_argument("--minhash-perm", type=int, default=128, help="weighted MinHash samples per vector")
    p.add_argument(
        "--memory-budget",
        default=None,
        help="search-time memory for the index, e.g. 8GB: picks the factory, nlist and on-disk lists (autofaiss-style)",
    )
    p.add_argument(
        "--ondisk",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="IVF inverted lists in one memory-mapped faiss.ivfdata file (default: when the budget needs it)",
    )
    p.add_argument("--ray-address", default=None)

    p = sub.add_parser("search", help="query an index by id or by image")
    p.add_argument("--index", required=True, help="index root")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--id", help="an id of the indexed dataset")
    q.add_argument("--image", help="an image file, encoded with the dataset's model")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--version", default=None, help="a version such as v3 (default: CURRENT)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("eval", help="retrieval metrics, ANN/LSH vs exact, attention statistics, HTML report")
    p.add_argument("--embeddings", required=True, help="gallery embeddings dataset")
    p.add_argument("--index", required=True, help="index root built from it")
    p.add_argument("--out", required=True, help="output directory: metrics.json, report.html")
    p.add_argument("--queries", help="a second encoded dataset as queries (default: a gallery sample, leave-one-out)")
    p.add_argument("--qrels", help="TREC qrels file (qid 0 docid rel) instead of same-label relevance")
    p.add_argument("--num-queries", type=int, default=1000, help="gallery sample size when no --queries")
    p.add_argument("--k", default="1,5,10,100", help="cut-offs, comma-separated")
    p.add_argument("--depth", type=int, default=10_000, help="ranking depth (full ranking for smaller galleries)")
    p.add_argument("--compare", nargs="*", default=[], help="other encodings of the same images (other heads)")
    p.add_argument(
        "--workers", type=int, default=0, help="Ray tasks reading the gallery (default: one per CPU when Ray is up)"
    )
    p.add_argument("--version", default=None, help="index version (default: CURRENT)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("reindex", help="re-encode only changed shards and publish a new index version (for cron)")
    p.add_argument("--input", nargs="+", required=True, help="all shards of the collection, as they are now")
    p.add_argument("--embeddings", required=True, help="embeddings dataset, updated in place (created if missing)")
    p.add_argument("--index", required=True, help="index root: versions v<N>/ and CURRENT (created if missing)")
    p.add_argument(
        "--faiss",
        default=None,
        help="faiss index_factory string (default: the live version's, or chosen from the count)",
    )
    p.add_argument(
        "--lsh",
        default=None,
        choices=LSH_CHOICES,
        help="LSH tables (default: the live version's, or simhash)",
    )
    p.add_argument("--force", action="store_true", help="re-encode everything when the model settings changed")
    # without --config, the config saved with the embeddings (_config.yaml) is the base
    p.add_argument("--keep", type=int, default=3, help="index versions to keep (default 3)")
    p.add_argument(
        "--max-growth",
        type=float,
        default=0.5,
        help="retrain the index when vectors added since its training reach this fraction (0.5 = +50%%)",
    )
    p.add_argument("--workers", type=int, default=0, help="Ray index tasks (default: one per CPU)")
    p.add_argument("--target-recall", type=float, default=0.95, help="recall@10 vs exact that nprobe is tuned to")
    _config_args(p)

    p = sub.add_parser("dedup", help="near-duplicate pairs and groups, and leakage into other datasets")
    add_dedup_arguments(p)

    p = sub.add_parser("train", help="fit the pooling head (and optionally the backbone's end) on labeled shards")
    _config_args(p)
    add_train_arguments(p)

    p = sub.add_parser("run", help="the whole pipeline; with no arguments, on a sample dataset it makes")
    p.add_argument("--workdir", default=DEMO_DIR, help=f"where data and outputs go (default ./{DEMO_DIR})")
    p.add_argument("--input", nargs="+", help="your shards instead of the generated sample")
    p.add_argument("--n", type=int, default=600, help="sample size when no --input is given")
    p.add_argument(
        "--train",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="first fit the head with a short schedule (default: on for the generated sample, where it "
        "trains on a second sample of its own; with --input it trains on the input)",
    )
    _config_args(p)
    _common_args(sub)
    return parser


def _verbosity_args(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("-v", "--verbose", action="count", default=default, help="more log lines (-vv: debug)")
    p.add_argument("-q", "--quiet", action="count", default=default, help="warnings and errors only")


def _common_args(sub) -> None:
    """Every sub-command (those added later too): shown defaults, ``--json``, ``-v``/``-q`` after the command."""
    for p in sub.choices.values():
        p.formatter_class = _HelpFormatter
        for action in p._actions:
            if action.help is None and _shows_default(action):
                action.help = "default: %(default)s"
        if "--json" not in p._option_string_actions:
            p.add_argument("--json", action="store_true", help="print a one-line JSON summary on stdout")
        if "-v" not in p._option_string_actions:
            _verbosity_args(p, argparse.SUPPRESS)  # SUPPRESS: `attnpipe -v encode` is not reset by the subparser


def _emit(args: argparse.Namespace, summary, human: str | None = None) -> None:
    """The one output convention: ``--json`` -> the summary on stdout; otherwise ``human`` as a log line."""
    if args.json:
        print(json.dumps(summary, default=str), flush=True)
    elif human:
        logger.info(human)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log.configure(getattr(args, "verbose", 0) - getattr(args, "quiet", 0))
    try:
        return COMMANDS[args.command](args)
    except (
        ConfigError,
        InputError,
        FileExistsError,
        FileNotFoundError,
        IndexLayoutError,
        KeyError,
        LockHeld,
        ValueError,
        store.DamagedData,
    ) as exc:
        logger.error("attnpipe %s: error: %s", args.command, exc)
        return 2


def cmd_sample(args: argparse.Namespace) -> int:
    from attnpipe.data.sample import make_sample_anywhere as make_sample

    paths = make_sample(
        args.out,
        fmt=args.format,
        n=args.n,
        num_shards=args.shards,
        image_size=args.image_size,
        seed=args.seed,
        broken=args.broken,
        classes=args.classes,
    )
    summary = {"out": args.out, "format": args.format, "images": args.n, "shards": [str(p) for p in paths]}
    _emit(args, summary, f"wrote {args.n} images in {len(paths)} {args.format} shards to {args.out}")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from attnpipe.encode import encode

    cfg = load_config(args.config, args.overrides)
    from attnpipe import fs
    from attnpipe.data.shards import check_inputs
    from attnpipe.lock import exclusive
    from attnpipe.reindex import LOCK

    check_inputs(args.input)  # before --out is created
    fs.makedirs(args.out)
    with exclusive(fs.join(args.out, LOCK), f"attnpipe encode --out {fs.display(args.out)}"):  # one writer
        summary = encode(
            args.input, args.out, cfg, overwrite=args.overwrite, resume=args.resume, ray_address=args.ray_address
        )
    _emit(args, summary)  # encode logs its own summary line
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from attnpipe import fs
    from attnpipe.index.build import build_index
    from attnpipe.index.config import IndexConfig, parse_bytes
    from attnpipe.lock import exclusive
    from attnpipe.reindex import LOCK
    from attnpipe.runtime import init_ray

    store.read_manifest(args.embeddings)  # fail fast, before Ray starts
    fs.makedirs(args.out)
    with exclusive(fs.join(args.out, LOCK), f"attnpipe index --out {fs.display(args.out)}"):  # not beside a reindex
        if args.workers >= 2 or args.ray_address:  # small data and one worker build in-process: no Ray start-up
            init_ray(args.ray_address)
        config = IndexConfig(
            factory=args.faiss,
            lsh=args.lsh,
            workers=args.workers,
            target_recall=args.target_recall,
            dedup_threshold=args.dedup_threshold,
            minhash_perm=args.minhash_perm,
            memory_budget=parse_bytes(args.memory_budget) if args.memory_budget else None,
            ondisk=args.ondisk,
        )
        manifest = build_index(args.embeddings, args.out, config)
    f = manifest["faiss"]
    summary = {k: manifest[k] for k in ("version", "count", "dim", "build_seconds")} | {
        "faiss": {k: v for k, v in f.items() if k != "tuning"}
    }
    param = next((p for p in ("nprobe", "efSearch") if p in f), None)
    tuned = f" at {param}={f[param]}" if param else ""
    _emit(
        args,
        summary,
        f"index: published {args.out}/{manifest['version']}: {manifest['count']} vectors, {f['factory']}{tuned}, "
        f"recall@10 {f.get('recall@10', float('nan')):.3f} vs exact, {manifest['build_seconds']:.1f} s",
    )
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from attnpipe.index.search import SearchIndex

    _check_version(args.version)
    if not 1 <= args.k <= MAX_K:
        raise ConfigError(f"-k must be between 1 and {MAX_K} (results to return), got {args.k}")
    index = SearchIndex.load(args.index, args.version)
    if args.id:
        hits = index.search_id(args.id, args.k)
    else:
        from attnpipe.query import search_image  # encodes the image: torch is imported only for --image

        hits = search_image(index, args.image, args.k)
    if args.json:
        print(json.dumps([{"id": i, "score": round(s, 6)} for i, s in hits]))
    else:  # the ranking is this command's product, so it goes to stdout either way
        for rank, (i, s) in enumerate(hits, 1):
            print(f"{rank:3d}  {s:.4f}  {i}")
    return 0


def _check_version(version: str | None) -> None:
    """A version names a directory under the index root: ``v<N>``, never a path (``../x`` would escape the root)."""
    if version is not None and not re.fullmatch(r"v[0-9]+", version):
        raise ConfigError(
            f"--version expects an index version such as v3 (a v<N> directory of the index root), got {version!r}"
        )


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(k) for k in text.split(",") if k.strip()}))
    except ValueError:
        raise ConfigError(f"--k expects comma-separated positive integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise ConfigError(f"--k expects comma-separated positive integers, got {text!r}")
    return ks


def cmd_eval(args: argparse.Namespace) -> int:
    from attnpipe import fs
    from attnpipe.evaluate.runner import evaluate, headline

    ks = _ks(args.k)
    _check_version(args.version)
    metrics = evaluate(
        args.embeddings,
        args.index,
        args.out,
        queries=args.queries,
        qrels=args.qrels,
        ks=ks,
        num_queries=args.num_queries,
        depth=args.depth,
        seed=args.seed,
        compare=tuple(args.compare),
        version=args.version,
        workers=args.workers,
    )
    summary = {
        "metrics": fs.join(args.out, "metrics.json"),
        "report": fs.join(args.out, "report.html"),
        "exact": metrics["exact"],
        "faiss": metrics.get("faiss"),
        "lsh": metrics.get("lsh"),
    }
    logger.info(headline(metrics))
    _emit(args, summary, f"report: {summary['report']}")
    return 0


def cmd_reindex(args: argparse.Namespace) -> int:
    """Ends with one JSON line on stdout: added/changed/removed/unchanged shard names, version, vectors, seconds."""
    from attnpipe import fs
    from attnpipe.index.config import IndexConfig
    from attnpipe.reindex import reindex

    config = args.config
    saved = fs.join(args.embeddings, store.CONFIG_FILE)
    if config is None and fs.is_file(saved):
        config = saved  # the settings that made the stored embeddings; --set still overrides them
        logger.info("reindex: using the config saved with the embeddings (%s)", saved)
    cfg = load_config(config, args.overrides)
    summary = reindex(
        args.input,
        args.embeddings,
        args.index,
        cfg,
        index=IndexConfig(
            factory=args.faiss,
            lsh=args.lsh,
            keep=args.keep,
            max_growth=args.max_growth,
            workers=args.workers,
            target_recall=args.target_recall,
        ),
        force=args.force,
        ray_address=args.ray_address,
    )
    _emit(
        args,
        summary,
        f"reindex: {len(summary.get('added', []))} added, {len(summary.get('changed', []))} changed, "
        f"{len(summary.get('removed', []))} removed, {len(summary.get('unchanged', []))} unchanged shards; "
        f"index {summary.get('version')} ({summary.get('index_update')}), {summary.get('vectors')} vectors",
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from attnpipe.pipeline import DEMO_SETTINGS, run_pipeline

    overrides = [*DEMO_SETTINGS, *args.overrides] if not args.config else args.overrides
    cfg = load_config(args.config, overrides)
    result = run_pipeline(cfg, args.workdir, args.input, args.n, args.train, args.ray_address)
    _emit(args, result)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from attnpipe.verify import verify

    report = verify(args.path, clean=args.clean)
    lines = [f"verify {report['path']}: {report['kind']}, {report['checked']} files checked"]
    lines += [f"  DAMAGED: {p}" for p in report["problems"]]
    lines += [f"  leftover{' (removed)' if args.clean else ''}: {x}" for x in report["leftovers"]]
    lines.append("  OK" if not report["problems"] else f"  {len(report['problems'])} problem(s)")
    _emit(args, report, "\n".join(lines))
    return 0 if not report["problems"] else 1


COMMANDS = {
    "sample": cmd_sample,
    "encode": cmd_encode,
    "verify": cmd_verify,
    "index": cmd_index,
    "search": cmd_search,
    "eval": cmd_eval,
    "reindex": cmd_reindex,
    "train": run_train_command,
    "run": cmd_run,
    "dedup": run_dedup_command,
}

if __name__ == "__main__":
    sys.exit(main())
