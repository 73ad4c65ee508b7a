"""Build a zoo from a recipe: chunked vmap training, crash-safe resumable writing, Fabric sharding.

How a build proceeds (``build_zoo``):

1. The recipe's networks (:meth:`Recipe.plan`) are grouped by architecture and batch size and
   cut into *chunks* of ``chunk_size`` networks with similar step counts (no padded samples in
   the vmap batch; finished networks leave the batch early, see :mod:`metanet.zoo.train`).
2. Each chunk is trained by :func:`metanet.zoo.train.train_chunk` and written as its own small
   zoo file ``<out>.parts/<fingerprint>/chunk-NNNNN.h5`` — atomically (temporary file, fsync,
   rename), so a chunk file either exists complete or not at all. The fingerprint hashes the
   normalized recipe and ``--limit``, so parts of another recipe are never reused.
3. When all chunks exist, they are merged (in chunk order) into ``<out>`` (again atomically), and
   the parts folder is removed.

Killing the build at any moment therefore loses at most the chunks in training; running the same
command again skips finished chunks (each network is trained and stored exactly once, and the
result is bit-identical to an uninterrupted build: every chunk's randomness derives from the
recipe seed and the chunk index). Ctrl-C stops the build at once (workers are killed, not waited
for). While a build runs it holds a lock on its output (:mod:`metanet.zoo.lock`): a second build
of the same file fails at once with :class:`~metanet.zoo.lock.ZooBuildLocked`, naming the PID.

Several cores of one machine (``workers > 1``): chunks are trained by a pool of forked worker
processes (one torch thread each by default), each writing its own chunk files as above; the
parent merges. Results are bit-identical to ``workers=1`` (a chunk's randomness is its own).

Scale-out (``devices * num_nodes > 1``): Lightning Fabric launches the ranks (``ddp_spawn`` with
the gloo backend on CPU); chunk ``i`` belongs to rank ``i % world_size``. Each rank merges its
chunks into its own shard ``<out stem>.shards/rank-RRR-of-WWW.h5``; after a barrier rank 0 writes
``<out>`` as HDF5 virtual datasets over the shards (see
:func:`metanet.data.zoo_store.write_virtual_zoo`), which :class:`~metanet.data.zoo_store.Zoo` opens
as one zoo. Keep the ``.shards`` folder next to the zoo file.
"""

from __future__ import annotations

import contextlib
import glob
import math
import multiprocessing
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metanet.data.zoo_store import (
    Zoo,
    ZooFormatError,
    ZooWriter,
    merge_zoos,
    write_virtual_zoo,
)
from metanet.zoo.lock import build_lock
from metanet.zoo.recipe import NetworkPlan, Recipe

DEFAULT_CACHE = Path(".cache") / "zoos"


@dataclass(frozen=True)
class Chunk:
    """Networks of one architecture trained together in one vmap batch."""

    index: int
    arch_index: int
    plans: tuple[NetworkPlan, ...]

    @property
    def file_name(self) -> str:
        return f"chunk-{self.index:05d}.h5"

    @property
    def run_ids(self) -> list[int]:
        return [p.run_id for p in self.plans]


def default_output(recipe: Recipe) -> Path:
    """``.cache/zoos/<recipe name>.h5`` (relative to the working directory)."""
    return DEFAULT_CACHE / f"{recipe.name}.h5"


def _steps(plan: NetworkPlan, n_train: int) -> int:
    hp = plan.hparams
    size = max(1, round(float(hp.get("train_fraction", 1.0)) * n_train))
    batch = min(int(hp.get("batch_size", size)), size)
    return int(hp.get("epochs", 1)) * math.ceil(size / batch)


def make_chunks(recipe: Recipe, plans: Sequence[NetworkPlan]) -> list[Chunk]:
    """Cut ``plans`` into chunks: per architecture and batch size, sorted by step count."""
    from metanet.zoo.data import recipe_task

    n_train = 0
    if recipe.kind == "classifier":
        n_train = recipe_task(recipe.data).train.num_samples
    chunks: list[Chunk] = []
    for a in range(len(recipe.architectures)):
        mine = [p for p in plans if p.arch_index == a]
        groups: dict[int, list[NetworkPlan]] = {}
        for p in mine:  # one batch size per chunk: no padded samples in the vmap batch
            groups.setdefault(int(p.hparams.get("batch_size", 0)), []).append(p)
        for _, group in sorted(groups.items()):
            if recipe.kind == "classifier":  # similar step counts train together
                group.sort(key=lambda p: (_steps(p, n_train), p.run_id))
            for s in range(0, len(group), recipe.chunk_size):
                chunks.append(Chunk(len(chunks), a, tuple(group[s : s + recipe.chunk_size])))
    return chunks


def _chunk_seed(recipe: Recipe, chunk: Chunk) -> int:
    return int(np.random.SeedSequence([recipe.seed, 7919, chunk.index]).generate_state(1)[0] >> 1)


def train_chunk_to_file(
    recipe: Recipe,
    chunk: Chunk,
    path: Path,
    fingerprint: str,
    device: str = "cpu",
    engine: str = "auto",
) -> None:
    """Train ``chunk`` (with ``engine``, see :func:`metanet.zoo.train.train_chunk`) and write its
    records to ``path`` (atomically)."""
    from metanet.zoo.data import recipe_task
    from metanet.zoo.train import classifier_data, siren_data, train_chunk

    arch = recipe.architectures[chunk.arch_index]
    plans = list(chunk.plans)
    task = recipe_task(recipe.data)
    extra: dict[str, list[Any]] | None = None
    if recipe.kind == "classifier":
        data = classifier_data(plans, flat=arch["type"] == "mlp", task=task, tasks=recipe.tasks)
    else:
        data, labels = siren_data(plans, task)
        extra = {
            "label": labels,
            "split": [p.split for p in plans],
            "image_index": [p.image_index for p in plans],
        }
    if recipe.shared_init is not None:  # which shared initialization each network started from
        extra = {**(extra or {}), "init_seed": [p.weight_seed for p in plans]}
    seed = _chunk_seed(recipe, chunk)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        result = train_chunk(
            arch, plans, data, recipe.keep_fractions, device=device, generator_seed=seed,
            extra_metrics=extra, engine=engine,
        )  # fmt: skip
    with ZooWriter(path, attrs={"fingerprint": fingerprint, "chunk": chunk.index}) as writer:
        writer.set_attr("run_ids", chunk.run_ids)
        # parts are temporary: written uncompressed (fast), compressed once by the merge
        writer.add(arch, result.params, result.metrics, result.hparams, compress=False)


def _chunk_done(path: Path, chunk: Chunk, fingerprint: str) -> bool:
    """Whether ``path`` holds exactly ``chunk``'s networks of this fingerprint."""
    if not path.exists():
        return False
    try:
        with Zoo.open(path) as z:
            attrs = z.attrs
            ok = attrs.get("fingerprint") == fingerprint and attrs.get("run_ids") == chunk.run_ids
            if ok:
                ids = set()
                for g in z:
                    ids |= set(int(i) for i in g.metrics["run_id"])
                ok = ids == set(chunk.run_ids)
    except (ZooFormatError, OSError, KeyError, ValueError):
        ok = False
    if not ok:
        path.unlink(missing_ok=True)
    return ok


def _root_attrs(recipe: Recipe, fingerprint: str, limit: int | None, n: int, world: int,
                engines: list[str]) -> dict:  # fmt: skip
    import yaml

    from metanet.zoo.data import recipe_task

    task = recipe_task(recipe.data)
    return {
        "name": recipe.name,
        "kind": recipe.kind,
        "data": recipe.data,
        "data_provider": str(task.config.get("provider", task.name)),
        "data_fingerprint": task.fingerprint(),
        "engines": list(engines),
        **({"tasks": recipe.tasks} if recipe.tasks is not None else {}),
        "recipe": yaml.safe_dump(recipe.to_dict(), sort_keys=False),
        "fingerprint": fingerprint,
        "num_networks": n,
        "limit": -1 if limit is None else int(limit),
        "world_size": world,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _existing_ok(output: Path, fingerprint: str, overwrite: bool) -> bool:
    """True when ``output`` already is this zoo; raises when it is something else."""
    if not output.exists():
        return False
    try:
        with Zoo.open(output) as z:
            theirs = z.attrs.get("fingerprint")
            same = theirs == fingerprint
    except (ZooFormatError, OSError) as err:
        if overwrite:
            return False
        raise FileExistsError(
            f"{output} exists and is not a readable zoo ({err}); it was left untouched - "
            "pass --overwrite to replace it"
        ) from None
    if same:
        return True
    if overwrite:
        return False
    raise FileExistsError(
        f"{output} exists and was built from another recipe, data, engine or --limit "
        f"(fingerprint {theirs}, this build {fingerprint}); it was left untouched - pass "
        "--overwrite to replace it"
    )


def _shard_path(output: Path, rank: int, world: int) -> Path:
    return output.parent / f"{output.stem}.shards" / f"rank-{rank:03d}-of-{world:03d}.h5"


def _chunk_cost(chunk: Chunk) -> float:
    """Relative training cost of a chunk (samples it trains on)."""
    return sum(
        float(p.hparams.get("epochs", 1)) * float(p.hparams.get("train_fraction", 1.0))
        for p in chunk.plans
    )


def _worker_init(threads: int, parent: int) -> None:
    """Set a chunk worker's torch threads; exit it as soon as its parent is gone (a killed build
    must not leave workers training, or idling, as orphans)."""
    torch.set_num_threads(threads)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="metanet-parent-watch", daemon=True).start()


def train_chunks(
    recipe: Recipe,
    chunks: Sequence[Chunk],
    parts: Path,
    fingerprint: str,
    device: str = "cpu",
    engine: str = "auto",
    workers: int = 1,
    threads: int | None = None,
    on_done: Callable[[Chunk], None] | None = None,
) -> None:
    """Train ``chunks`` into their files under ``parts`` (:func:`train_chunk_to_file`), in this
    process (``workers=1``) or in a pool of ``workers`` worker processes (CPU only; forked where
    the platform allows) with ``threads`` torch threads each (default: the cores divided between
    the workers), costliest chunks first. ``on_done(chunk)`` is called as each chunk is written.
    A failing chunk cancels the chunks not yet started and re-raises; written chunks are kept.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1 or len(chunks) <= 1 or device != "cpu":
        for chunk in chunks:
            train_chunk_to_file(recipe, chunk, parts / chunk.file_name, fingerprint,
                                device=device, engine=engine)  # fmt: skip
            if on_done is not None:
                on_done(chunk)
        return
    workers = min(workers, len(chunks))
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    order = sorted(chunks, key=lambda c: (-_chunk_cost(c), c.index))
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                             initargs=(threads, os.getpid())) as pool:  # fmt: skip
        futures = {
            pool.submit(train_chunk_to_file, recipe, c, parts / c.file_name, fingerprint,
                        device, engine): c  # fmt: skip
            for c in order
        }
        try:
            for future in as_completed(futures):
                future.result()
                if on_done is not None:
                    on_done(futures[future])
        except KeyboardInterrupt:  # the user wants out now: chunks in training are lost anyway
            _stop_workers(pool)
            raise
        except BaseException:  # a failing chunk: let the running ones finish and be written
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel the pool's queued chunks and kill its workers at once (Ctrl-C of a build)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.kill()
    for process in processes:
        process.join(timeout=5)


def _run(
    fabric: Any,
    recipe: Recipe,
    output: Path,
    limit: int | None,
    overwrite: bool,
    progress: bool,
    device: str,
    threads: int | None = None,
    engine: str = "auto",
    workers: int = 1,
) -> str:
    rank = fabric.global_rank if fabric is not None else 0
    world = fabric.world_size if fabric is not None else 1
    if fabric is not None:
        device = str(fabric.device)
        if fabric.device.type == "cpu" and threads:  # cores shared between the node's ranks
            torch.set_num_threads(threads)
    from metanet.zoo.data import recipe_task
    from metanet.zoo.train import engine_fingerprint, resolve_engine

    task = recipe_task(recipe.data) if recipe.kind == "classifier" else None  # streams?
    engines = [resolve_engine(a, engine, recipe.kind == "siren", device, task=task)
               for a in recipe.architectures]  # fmt: skip
    fingerprint = recipe.fingerprint(limit, [engine_fingerprint(e) for e in engines])
    done = _existing_ok(output, fingerprint, overwrite) if rank == 0 else False
    if fabric is not None:
        done = bool(fabric.broadcast(done, src=0))
    parts_root = output.parent / f"{output.name}.parts"
    if done:
        if rank == 0:
            shutil.rmtree(parts_root, ignore_errors=True)
            print(f"{output}: already complete ({recipe.name}, fingerprint {fingerprint})",
                  file=sys.stderr)  # fmt: skip
        return str(output)
    parts = parts_root / fingerprint
    parts.mkdir(parents=True, exist_ok=True)
    plans = recipe.plan(limit)
    chunks = make_chunks(recipe, plans)
    mine = [c for c in chunks if c.index % world == rank]
    todo = [c for c in mine if not _chunk_done(parts / c.file_name, c, fingerprint)]
    for stale in glob.glob(str(parts / ".*.tmp")):  # left by a killed writer of this rank's chunks
        if any(os.path.basename(stale).startswith(f".{c.file_name}.") for c in mine):
            os.remove(stale)
    total = sum(len(c.plans) for c in mine)
    initial = total - sum(len(c.plans) for c in todo)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total, initial=initial, unit="net", desc=f"{recipe.name}" + (
            f" [rank {rank}/{world}]" if world > 1 else ""),
        disable=not progress or rank != 0, dynamic_ncols=True,
    )  # fmt: skip
    per_worker = max(1, threads // workers) if threads else None
    train_chunks(recipe, todo, parts, fingerprint, device, engine, workers, per_worker,
                 on_done=lambda c: bar.update(len(c.plans)))  # fmt: skip
    bar.close()
    attrs = _root_attrs(recipe, fingerprint, limit, len(plans), world, engines)
    if world == 1:
        merge_zoos([parts / c.file_name for c in chunks], output, attrs=attrs)
        shutil.rmtree(parts_root, ignore_errors=True)
        return str(output)
    shard = _shard_path(output, rank, world)
    shard.parent.mkdir(parents=True, exist_ok=True)
    if mine:
        merge_zoos([parts / c.file_name for c in mine], shard, attrs={**attrs, "rank": rank})
    fabric.barrier()
    if rank == 0:
        shards = [
            _shard_path(output, r, world)
            for r in range(world)
            if any(c.index % world == r for c in chunks)
        ]
        write_virtual_zoo(output, shards, attrs=attrs)
        shutil.rmtree(parts_root, ignore_errors=True)
    fabric.barrier()
    return str(output)


def _fabric_entry(fabric: Any, *args: Any) -> str:
    return _run(fabric, *args)


def build_zoo(
    recipe: Recipe | str | os.PathLike,
    output: str | os.PathLike | None = None,
    limit: int | None = None,
    devices: int = 1,
    num_nodes: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    accelerator: str = "cpu",
    threads: int | None = None,
    engine: str = "auto",
    workers: int = 1,
) -> Path:
    """Build (or finish building) the zoo of ``recipe`` into ``output``; returns its path.

    Args:
        recipe: a :class:`Recipe` or the path of a YAML recipe.
        output: zoo file (default ``.cache/zoos/<name>.h5``).
        limit: build only the first ``limit`` networks (run ids) of the recipe.
        devices, num_nodes: Lightning Fabric ranks per node / nodes; more than one rank in total
            shards the chunks across ranks (each writes its own shard file).
        overwrite: replace an existing ``output`` that belongs to another recipe/limit or is
            unreadable (otherwise such a file is left untouched and ``FileExistsError`` raised).
        progress: show a tqdm bar (networks done / total, ETA) on rank 0.
        accelerator: ``"cpu"`` or ``"cuda"`` (or ``"auto"``) for Fabric / training.
        threads: torch CPU threads per rank (default: torch's setting, divided between the
            ranks of a node). On a busy shared machine 1 thread is often fastest.
        engine: ``"auto"`` (hand-batched engine where the arch allows, else ``torch.func``
            vmap), ``"batched"`` or ``"vmap"`` (see :func:`metanet.zoo.train.train_chunk`).
            Engines agree up to float rounding; resume a build with the engine it started with
            for a bit-identical result.
        workers: worker processes per rank training chunks side by side (CPU; each with
            ``threads`` torch threads, default the cores divided between them). Tiny networks
            use one core far better per process than per thread; results are identical.

    Running the same call again after an interruption resumes from the finished chunks.

    Raises:
        ZooBuildLocked: another process is building ``output`` (single-node builds; see
            :mod:`metanet.zoo.lock`).
    """
    if not isinstance(recipe, Recipe):
        recipe = Recipe.load(recipe)
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be a positive integer, got {limit}")
    from metanet.zoo.train import ENGINES

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    if devices < 1 or num_nodes < 1:
        raise ValueError(f"devices and num_nodes must be >= 1, got {devices} and {num_nodes}")
    output = Path(output) if output is not None else default_output(recipe)
    output.parent.mkdir(parents=True, exist_ok=True)
    args = (recipe, output, limit, overwrite, progress)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    # one build per output file (ZooBuildLocked names the holder); on several nodes each node
    # runs this same call on a shared file system, so there the scheduler keeps builds apart
    lock = build_lock(output) if num_nodes == 1 else contextlib.nullcontext()
    with lock:
        if devices * num_nodes == 1:
            device = "cuda" if accelerator in ("cuda", "gpu") else "cpu"
            if accelerator == "auto" and torch.cuda.is_available():
                device = "cuda"
            return Path(_run(None, *args, device, threads, engine, workers))
        from lightning.fabric import Fabric

        fabric = Fabric(
            accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp_spawn"
        )
        per_rank = threads or max(1, (os.cpu_count() or 1) // devices)
        result = fabric.launch(_fabric_entry, *args, "cpu", per_rank, engine, workers)
        return Path(result if result is not None else output)
