"""``metanet generate``: sample networks from a trained weight generator.

    metanet generate --generator RUN.ckpt --n 100 [--condition NAME ...] -o OUT/

writes ``OUT/net_0000.safetensors`` ... (plain safetensors ``state_dict`` files of
``build_module(arch)``, loadable without pickle by any safetensors tool; the arch dict is written
to ``OUT/arch.json``) and, when the target task is a classifier whose data this machine can read
(:func:`metanet.generate.evaluate.can_evaluate`), ``OUT/generated.csv`` with each network's test
accuracy (on its condition's own classes when the condition is a task of class subsets, and on
every task's classes as ``acc_<task>`` columns). When the zoo's data has a validation split, a
``val_acc`` column is added and the summary names the best network *by validation accuracy*
(its test accuracy beside the median and mean of all networks; nothing is chosen on test).

Networks of any module family: a generator trained through a flat parameter layout
(:class:`metanet.generate.data.FlatLayout`: a CNN with BatchNorm, a user module) writes each
network with the layout's buffers (the zoo's average BatchNorm running statistics);
``--calibrate-bn K`` recomputes every BatchNorm layer's running statistics on ``K`` batches
(``--calibrate-batch-size``, default 64) of the train split of the zoo's data after generation
(:func:`metanet.hyper.calibrate.calibrate_batchnorm`), before the networks are written and
evaluated (a no-op for networks without BatchNorm).

``--against ZOO`` measures novelty against the training networks in ``ZOO`` (the group of the
generator's architecture, aligned to the generator's reference network):
``max_error_iou`` (the maximum IoU of the network's misclassified test samples with those of any
training network) and ``aligned_l2_nn`` (aligned L2 distance to the nearest training network)
columns, and ``memorized`` (1 for a near copy; :func:`metanet.generate.novelty.novelty`). Runs the
generator held out of its training (``GeneratorDataModule(holdout=...)``) are not training
networks and are left out when ``ZOO`` is the zoo it was trained on. For a flat-layout generator
the training networks are read through the same layout and loaded like the generated ones (the
layout's buffers, then ``--calibrate-bn`` recalibration when given, so a copy of a checkpoint
makes the same errors). A flat-layout generator trained canonicalized (a Linear/Conv chain with
BatchNorm) has its training networks aligned to its reference network, BatchNorm parameters
moving with their channels (``aligned_l2_nn``); any other flat layout (residual blocks, a user
module) has no permutation alignment, so its distance column is ``unaligned_l2_nn`` (plain L2
between parameter vectors).

The generator checkpoint is read tensors-only; ``--trust-pickle`` allows a full unpickle of a
checkpoint that needs one, which runs code named in the file (only for files you trust).

Memory: before sampling, the memory the job needs is estimated (:func:`estimate_memory`: the
sampler's working copies of a batch of networks, the backbone's activations, the ``n`` finished
networks and their de-normalized copies, and the evaluation) and checked against metanet's limit
(``METANET_MEMORY_LIMIT_GB``, default 75% of the machine); a job over it stops with an error
naming the estimate, before anything is allocated or written.

Writing is crash safe and a rerun into the same folder is clean:

1. ``arch.json`` and ``generated.csv`` of an earlier run are removed first (they would describe
   other networks), and so are temporary files left by a killed run;
2. every network is written atomically (temporary file + rename), so a file under a final name is
   always complete;
3. once the new networks are all written, every other ``net_NNNN.safetensors`` or
   ``net_NNNN.pt`` file in the folder (of an earlier larger ``--n``, or ``.pt`` files of older
   metanet versions) is removed;
4. ``arch.json`` is written (atomically) once the folder holds exactly the ``n`` new networks, and
   ``generated.csv`` (atomically) after the evaluation.

A folder that has ``arch.json`` therefore holds exactly the networks of one complete run; a run
killed at any point leaves no partial file, and running the same command again completes it.

Bad input (a condition the generator was not trained with, a checkpoint of another task or of
another architecture than ``--arch``, an ``--against`` zoo without networks of the generator's
architecture, a checkpoint that needs pickle without
``--trust-pickle``, an unreadable file, test data that cannot be read for the evaluation or the
recalibration, ``n <= 0``, ``--calibrate-bn < 0``, a job over the memory limit) prints
``error: ...`` and exits with 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["estimate_memory", "main"]

NET_SUFFIX = ".safetensors"
_NET_FILE = re.compile(r"^net_\d+\.(safetensors|pt)$")
_TMP_FILE = re.compile(r"^\.(net_\d+\.(safetensors|pt)|arch\.json|generated\.csv)\.(\d+)\.tmp$")

# The factors below were measured as the peak resident memory of ``GenerationTask.sample``
# (``VmHWM`` after ``echo 5 > /proc/self/clear_refs``) over the resident memory before it, one
# fresh process per configuration, CPU, float32, digits MLPs of D = 682 to 85,002 parameters,
# n = 32 to 2048 networks, flow (MLP and transformer backbones, Heun/Euler, with and without
# guidance) and latent diffusion (MLP and transformer autoencoders, DDIM/DDPM). With them the
# estimate is 0.99-1.25 times the measured peak in every configuration (it ignores the ~10 MiB
# of fixed allocator overhead, which matters only for jobs far below any limit).
#
# Sampler working copies of one batch of D-vectors: measured 8.1 (Heun) and 6.1 (Euler) with a
# narrow backbone, where the vectors dominate. Latent diffusion works on latent codes, given the
# same bound. ``_OUTPUT_COPIES``: the finished batches, their concatenation and its
# de-normalization at the end (measured 3.0 copies of n * D for flow, 3.1 for latent diffusion,
# n = 2048).
_SAMPLER_COPIES = {"heun": 8.5, "euler": 6.5, "ddpm": 8.5, "ddim": 8.5}
_OUTPUT_COPIES = 3.5
# Backbone activations per network and forward call (doubled by guidance), in float32 numbers
# per unit of width: the residual MLP keeps several ``hidden`` and ``2 * hidden`` wide tensors
# (measured 13-15 x hidden, hidden = 2048); a transformer layer keeps token states and one
# materialized ``heads * tokens**2`` attention matrix (measured 1.0 copies, 1,330 tokens).
_MLP_WIDTHS = 16.0
_TOKEN_WIDTHS = 8.0
_ATTENTION_COPIES = 1.1
_SAMPLE_BATCH = 512  # GenerationTask.sample's default batch_size


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # no SystemExit: main() reports and returns 2
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="metanet generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--generator", required=True, help="generator checkpoint (metanet fit)")
    p.add_argument("--n", type=int, required=True, help="number of networks to write")
    p.add_argument(
        "--condition",
        action="append",
        default=None,
        help="condition name (repeat to cycle over several; default: every condition in turn)",
    )
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: generator's)")
    p.add_argument("--sampler", default=None, help="euler|heun (flow), ddpm|ddim (diffusion)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance weight")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="scale of the sampler's noise (default: generator's, usually 1)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    p.add_argument(
        "--arch",
        default=None,
        help="JSON arch dict the networks must fit (checked against the generator)",
    )
    p.add_argument("--no-eval", action="store_true", help="do not evaluate the networks")
    p.add_argument(
        "--against",
        default=None,
        metavar="ZOO",
        help="zoo of the generator's training networks: add novelty columns (max error IoU, "
        "aligned L2 nearest-neighbour distance (unaligned for a flat-layout generator), "
        "memorized) to generated.csv",
    )
    p.add_argument(
        "--calibrate-bn",
        type=int,
        default=0,
        metavar="K",
        help="recompute BatchNorm running statistics on K batches of the zoo data's train split "
        "after generation, before writing and evaluating (default 0: keep the generator's "
        "buffers)",
    )
    p.add_argument(
        "--calibrate-batch-size",
        type=int,
        default=64,
        help="samples per --calibrate-bn batch (default 64)",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow a full unpickle of a generator checkpoint that needs it: this RUNS CODE "
        "named in the file, pass it only for files from a source you trust (default: tensors "
        "only)",
    )
    return p


def _check_arch(requested: str, arch: dict) -> None:
    from metanet.zoo.architectures import arch_name

    try:
        want = json.loads(requested)
    except ValueError as err:
        raise _UsageError(f"--arch is not valid JSON ({err})") from None
    try:
        same = arch_name(want) == arch_name(arch)
    except Exception as err:  # noqa: BLE001 - any invalid arch dict is a usage error
        raise _UsageError(f"--arch is not a valid arch dict ({err})") from None
    if not same:
        raise _UsageError(
            f"the generator writes '{arch_name(arch)}' networks, not '{arch_name(want)}'"
        )


# ------------------------------------------------------------------------------------------------
# memory estimate
# ------------------------------------------------------------------------------------------------
def _transformer_numbers(layers: torch.nn.Module, hidden: int, tokens: int) -> float:
    """Activation numbers per network of a ``TransformerEncoder`` over ``tokens`` tokens."""
    first = layers.layers[0] if hasattr(layers, "layers") else layers
    heads = int(getattr(first.self_attn, "num_heads", 1))
    return tokens * (_TOKEN_WIDTHS * hidden + _ATTENTION_COPIES * heads * tokens)


def _backbone_numbers(net: torch.nn.Module | None) -> float:
    """Activation numbers per network of one forward call of a sampler backbone."""
    from metanet.generate.backbones import ResidualMLP, TokenTransformer

    if isinstance(net, TokenTransformer):
        return _transformer_numbers(net.encoder, net.inp.out_features, net.tokens + 1)
    if isinstance(net, ResidualMLP):
        return _MLP_WIDTHS * net.inp.out_features
    if net is None:
        return 0.0
    widths = [m.out_features for m in net.modules() if isinstance(m, torch.nn.Linear)]
    return _MLP_WIDTHS * max(widths, default=0)


def _decoder_numbers(ae: torch.nn.Module | None) -> float:
    """Activation numbers per network of a parameter autoencoder's ``decode``."""
    if ae is None:
        return 0.0
    if getattr(ae, "mixer", "mlp") == "mlp":
        return float(sum(m.out_features for m in ae.dec_mlp if isinstance(m, torch.nn.Linear)))
    hidden = ae.dec_in.out_features
    return _transformer_numbers(ae.dec, hidden, ae.tokens) + ae.tokens * ae.chunk


def _activation_numbers(arch: Mapping[str, Any]) -> int:
    """Numbers of every layer output for one input example of ``build_module(arch)``."""
    from metanet.zoo.architectures import build_module, input_shape

    module = build_module(dict(arch)).eval()
    total = [0]

    def hook(_mod: torch.nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            total[0] += out.numel()

    handles = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            module(torch.zeros(1, *input_shape(arch)))
    finally:
        for h in handles:
            h.remove()
    return total[0] + int(torch.Size(input_shape(arch)).numel())


def estimate_memory(
    gen: Any,
    n: int,
    method: str | None = None,
    guidance: float | None = None,
    eval_examples: int = 0,
    batch_size: int = _SAMPLE_BATCH,
) -> int:
    """Estimated peak memory in bytes of sampling ``n`` networks with ``gen`` (a loaded
    :class:`~metanet.tasks.generation.GenerationTask`), writing them and evaluating them on
    ``eval_examples`` test examples (0: no evaluation).

    Sampling runs in batches of ``batch_size``: one batch's working copies (the sampler's
    vectors, the backbone's activations, doubled by classifier-free guidance, the decoder of a
    latent generator) plus the finished networks, or, at the end, the ``n`` networks with their
    concatenated and de-normalized copies, whichever is larger. See the module's constants for
    the measured factors.
    """
    info = gen.info
    dim = int(info["dim"])
    b = min(n, batch_size)
    method = method or gen.hparams.sampler
    guidance = float(gen.hparams.guidance if guidance is None else guidance)
    calls = 2 if guidance != 1.0 else 1
    copies = _SAMPLER_COPIES.get(method, max(_SAMPLER_COPIES.values()))
    if hasattr(gen, "ae"):  # latent diffusion: the sampler works on latent codes, then decodes
        code = int(gen.latent_mean.numel())
        per_net = copies * code + calls * _backbone_numbers(getattr(gen, "denoiser", None))
        # the decoded batch, its padded decoder output and de-normalized copies (measured:
        # 3.7-3.8 copies of the batch's vectors at n = 512, D = 85,002)
        per_net += _decoder_numbers(gen.ae) + 3 * dim
    else:
        per_net = copies * dim + calls * _backbone_numbers(getattr(gen, "net", None))
    working = b * per_net + (n - b) * dim
    sampling = max(working, _OUTPUT_COPIES * n * dim)
    writing = 2 * dim  # one network's state_dict and its contiguous copy
    evaluation = 2 * eval_examples * _activation_numbers(info["arch"]) if eval_examples else 0
    return int(4 * (sampling + max(writing, evaluation)))


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(folder: Path) -> None:
    """Temporary files of this command left in ``folder`` by a killed run (dead writer pid)."""
    for p in folder.iterdir():
        m = _TMP_FILE.match(p.name)
        if m and not _pid_alive(int(m.group(3))):
            p.unlink(missing_ok=True)


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    from metanet.serialization import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            csv.writer(fh).writerows(rows)

    atomic_write(path, write)


def run(args: argparse.Namespace) -> str:
    """Sample, write and evaluate; returns a one-line summary."""
    from metanet.data.tasks import TaskDataError
    from metanet.generate.data import network_layout
    from metanet.generate.evaluate import (
        calibration_batches,
        can_evaluate,
        classifier_accuracy,
        load_eval_splits,
        load_network,
        load_test_split,
    )
    from metanet.limits import check_memory, memory_limit_bytes
    from metanet.serialization import atomic_write, save_state_dict
    from metanet.tasks.generators import load_generator
    from metanet.zoo.architectures import build_module

    if args.n <= 0:
        raise _UsageError(f"--n must be a positive integer, got {args.n}")
    if args.steps is not None and args.steps <= 0:
        raise _UsageError(f"--steps must be a positive integer, got {args.steps}")
    if args.calibrate_bn < 0 or args.calibrate_batch_size <= 0:
        raise _UsageError(
            f"--calibrate-bn must be >= 0 and --calibrate-batch-size > 0, got "
            f"{args.calibrate_bn} and {args.calibrate_batch_size}"
        )
    try:
        memory_limit_bytes()  # a malformed METANET_MEMORY_LIMIT_GB is a usage error
    except ValueError as err:
        raise _UsageError(str(err)) from None
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise _UsageError(f"-o {out} exists and is not a folder")
    gen = load_generator(args.generator, trust_pickle=args.trust_pickle)
    info = gen.info
    if args.arch is not None:
        _check_arch(args.arch, info["arch"])
    evaluate = not args.no_eval and can_evaluate(info)
    layout = network_layout(info)
    if args.against is not None and not evaluate:
        raise _UsageError("--against needs the evaluation (a classifier zoo, without --no-eval)")
    calibration = None
    if args.calibrate_bn:
        try:
            calibration = calibration_batches(info, args.calibrate_bn, args.calibrate_batch_size)
        except TaskDataError as err:
            raise _UsageError(f"cannot recalibrate BatchNorm (--calibrate-bn): {err}") from None
    x = y = None
    val = None
    if evaluate:
        try:
            x, y = load_test_split(info)
            splits = load_eval_splits(info)
        except TaskDataError as err:
            raise _UsageError(
                f"cannot evaluate the networks: {err} (pass --no-eval to skip the evaluation)"
            ) from None
        if splits.source == "val":
            val = (splits.x_val, splits.y_val)
    train_group = None
    if args.against is not None:
        from metanet.generate.data import ZooInputError, zoo_group_for

        try:
            train_group = zoo_group_for(args.against, info["arch"], flat=layout is not None)
        except (ZooInputError, OSError) as err:
            raise _UsageError(f"--against: {err}") from None
    examples = max(len(x) if x is not None else 0, args.calibrate_bn * args.calibrate_batch_size)
    estimate = estimate_memory(gen, args.n, args.sampler, args.guidance, eval_examples=examples)
    check_memory(estimate, f"generating {args.n} networks of {info['dim']:,} parameters")
    start = time.perf_counter()
    ws, names = gen.sample(
        args.n,
        args.condition,
        steps=args.steps,
        method=args.sampler,
        guidance=args.guidance,
        seed=args.seed,
        temperature=args.temperature,
    )
    elapsed = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    for old in ("arch.json", "generated.csv"):
        (out / old).unlink(missing_ok=True)
    module = build_module(info["arch"])
    files = []
    for i in range(len(ws)):
        load_network(module, ws, i, layout, calibration)
        name = f"net_{i:04d}{NET_SUFFIX}"
        save_state_dict(out / name, module.state_dict())
        files.append(name)
    keep = set(files)
    for p in out.iterdir():
        if _NET_FILE.match(p.name) and p.name not in keep:
            p.unlink(missing_ok=True)
    arch_json = json.dumps(info["arch"])
    atomic_write(out / "arch.json", lambda tmp: tmp.write_text(arch_json))
    summary = f"wrote {len(ws)} networks to {out} ({len(ws) / elapsed:.1f} networks/s)"
    if calibration is not None:
        summary += (
            f", BatchNorm running statistics recalibrated on {len(calibration)} train batches"
            if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())
            else " (no BatchNorm layer to recalibrate)"
        )
    if not evaluate:
        return summary
    tasks = info.get("task_classes") or {}
    load = {"layout": layout, "calibration": calibration}
    acc_all = classifier_accuracy(ws, info["arch"], x, y, **load)
    per_task = {
        t: classifier_accuracy(ws, info["arch"], x, y, cls, **load) for t, cls in tasks.items()
    }
    own = [
        float(per_task[c][i]) if c in per_task else float(acc_all[i]) for i, c in enumerate(names)
    ]
    val_own: list[float] | None = None
    if val is not None:
        val_all = classifier_accuracy(ws, info["arch"], *val, **load)
        val_task = {
            t: classifier_accuracy(ws, info["arch"], *val, cls, **load) for t, cls in tasks.items()
        }
        val_own = [
            float(val_task[c][i]) if c in val_task else float(val_all[i])
            for i, c in enumerate(names)
        ]
    nov = (
        _novelty_columns(gen, ws, train_group, x, y, layout, calibration)
        if train_group is not None
        else None
    )
    l2_name = "aligned_l2_nn" if nov is None or nov.aligned else "unaligned_l2_nn"
    header = ["file", "condition", "test_acc", "test_acc_all_classes",
              *[f"acc_{t}" for t in per_task]]  # fmt: skip
    if val_own is not None:
        header.append("val_acc")
    if nov is not None:
        header += ["max_error_iou", l2_name, "memorized"]
    rows = [header]
    for i, f in enumerate(files):
        row = [
            f,
            names[i] or "",
            f"{own[i]:.4f}",
            f"{float(acc_all[i]):.4f}",
            *[f"{float(a[i]):.4f}" for a in per_task.values()],
        ]
        if val_own is not None:
            row.append(f"{val_own[i]:.4f}")
        if nov is not None:
            row += [f"{float(nov.iou[i]):.4f}", f"{float(nov.distance[i]):.4f}",
                    str(int(nov.memorized[i]))]  # fmt: skip
        rows.append(row)
    _write_csv(out / "generated.csv", rows)
    own_t = torch.tensor(own)
    text = f"{summary}; test_acc median {own_t.median():.4f} mean {own_t.mean():.4f}"
    if val_own is not None:
        b = int(torch.tensor(val_own).argmax())
        text += f"; best by val_acc: {files[b]} (val {val_own[b]:.4f}, test {own[b]:.4f})"
    if nov is not None:
        l2_text = "aligned L2 NN" if nov.aligned else "unaligned L2 NN (flat layout)"
        text += (
            f"; novelty: max error IoU median {nov.iou.median():.3f}, {l2_text} median "
            f"{nov.distance.median():.3f}, memorized {nov.memorized.float().mean():.0%}"
        )
    return f"{text} (generated.csv)"


def _same_zoo(info: Mapping[str, Any], group: Any) -> bool:
    """Whether zoo ``group`` is the one the generator was trained on (same file fingerprint)."""
    zoo = info.get("zoo_info") or {}
    attrs = dict(getattr(getattr(group, "zoo", None), "attrs", {}) or {})
    fp = str(attrs.get("fingerprint", ""))
    return bool(fp) and fp == zoo.get("fingerprint")


def _flat_channels(info: Mapping[str, Any]) -> Any:
    """The channel permutations of a canonicalized flat-layout generator's architecture
    (:class:`~metanet.generate.canonicalize.ChannelPermutations`), or ``None`` when they are
    unknown (then the novelty distance stays unaligned)."""
    from metanet.generate.canonicalize import ChannelPermutations
    from metanet.weightspace import WeightSpaceError
    from metanet.zoo.architectures import build_module

    try:
        return ChannelPermutations.from_module(build_module(dict(info["arch"])))
    except WeightSpaceError:
        return None


def _novelty_columns(
    gen: Any,
    ws: Any,
    group: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    layout: Any = None,
    calibration: Sequence[torch.Tensor] | None = None,
) -> Any:
    """Novelty of ``ws`` against the networks of zoo ``group``: a
    :class:`metanet.generate.novelty.NoveltyReport`. Weight-space networks are aligned to the
    generator's reference network; a flat ``layout``'s too when the generator was trained
    canonicalized (a chain with BatchNorm, :func:`_flat_channels`), else compared as they are
    (unaligned L2); both sides are loaded through the layout and recalibrated on the same
    ``calibration`` batches (error sets of the training networks as stored)."""
    from metanet.generate.canonicalize import canonicalize
    from metanet.generate.novelty import error_sets, novelty
    from metanet.limits import check_memory
    from metanet.weightspace import WeightSpace

    info = gen.info
    check_memory(len(group) * int(info["dim"]) * 8, f"the {len(group)} networks of --against")
    held = set(info.get("holdout_records") or []) if _same_zoo(info, group) else set()
    records = [i for i in range(len(group)) if i not in held]
    if layout is not None:
        vectors = layout.flatten(group.params(records))
        train_ws = WeightSpace.unflatten(vectors, gen.spec)
        train_errors = error_sets(train_ws, info["arch"], x, y, layout, calibration)
        channels = _flat_channels(info) if info.get("canonicalized") else None
        reference = None
        if channels is not None:  # distances in the frame of the generator's reference network
            ref = gen.reference.detach().float().cpu()
            vectors = layout.canonicalize(vectors, channels, ref)
            reference = WeightSpace.unflatten(ref[None], gen.spec)
        return novelty(ws, vectors, train_errors, reference, info["arch"], x, y, layout=layout,
                       calibration=calibration, channels=channels)  # fmt: skip
    train = group.weight_space(records).to(torch.float32)
    reference = WeightSpace.unflatten(gen.reference.detach().float().cpu()[None], gen.spec)
    train_aligned = canonicalize(train, reference).flatten()
    train_errors = error_sets(WeightSpace.unflatten(train_aligned, gen.spec), info["arch"], x, y,
                              calibration=calibration)  # fmt: skip
    return novelty(ws, train_aligned, train_errors, reference, info["arch"], x, y,
                   calibration=calibration)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``metanet generate``; returns the exit code."""
    from metanet.limits import MemoryLimitError
    from metanet.serialization import FileError
    from metanet.tasks.generation import GenerationError
    from metanet.weightspace import WeightSpaceError

    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        return 0
    try:
        args = parser.parse_args(argv)
        print(run(args))
    except (_UsageError, GenerationError, WeightSpaceError, FileError, MemoryLimitError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
