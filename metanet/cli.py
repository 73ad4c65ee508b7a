"""The ``metanet`` command.

``metanet fit|validate|test|predict --config CONFIG.yaml`` runs LightningCLI over any of metanet's
tasks (``model:``) and data modules (``data:``), given as ``class_path`` / ``init_args``.
The other sub-commands are metanet's own jobs:

``metanet zoo build RECIPE.yaml``               build a model zoo (metanet.zoo)
``metanet predict-accuracy --predictor CKPT ...`` rank checkpoints by predicted test accuracy
``metanet init-weights --ghn CKPT --model ...``   write GHN-predicted initial weights
``metanet generate --generator CKPT --n N ...``   sample new networks from a weight generator
"""

from __future__ import annotations

import importlib
import pickle
import sys
from collections.abc import Sequence

# Sub-command -> "module:function"; each takes argv (list[str]) and returns an exit code.
JOBS = {
    "zoo": "metanet.zoo.cli:main",
    "predict-accuracy": "metanet.tasks.predict_cli:main",
    "init-weights": "metanet.hyper.cli:main",
    "generate": "metanet.generate.cli:main",
}
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


# Sizes that follow from the data: data-module attribute -> argument of the task's metanetwork.
# Linked on instantiation (the data module is built first, its attribute fills the argument); a
# link is skipped where the data module lacks the attribute (WeightSpaceDataModule) or the
# metanetwork the argument (weight-space models), so one parser serves every task and model.
# Not linked, because jsonargparse cannot: ``node_in_dim`` (the tasks' ``model`` is typed
# ``Callable[[WeightSpaceSpec], nn.Module]``, so jsonargparse reserves the first positional
# parameter of the class for the call and drops it from the parser), the WeightSpaceSpec (that
# call's argument, known after ``setup()``), and ``num_classes`` / ``out_dim`` (known only after
# ``setup()`` reads the labels, and a link cannot tell a classification task's metanetwork from a
# regression one's). Those reach the model in ``MetanetTask.setup`` from the data module.
DATA_LINKS = {
    "edge_in_dim": "model.init_args.model.init_args.edge_in_dim",
    "input_features": "model.init_args.in_features",
    "output_classes": "model.init_args.num_classes",
}


class MetanetCLI:
    """LightningCLI with metanet's defaults: tasks and data modules chosen by class path,
    ``--ckpt_path`` read tensors-only (``--weights_only false`` is the explicit way to trust a
    checkpoint that needs the full unpickler), and the graph models' input widths linked to the
    data module's (:data:`DATA_LINKS`; linked arguments are not set in configs)."""

    def __new__(cls, args: Sequence[str] | None = None, run: bool = True):
        from lightning.pytorch.cli import LightningCLI

        class _SafeCLI(LightningCLI):
            def add_arguments_to_parser(self, parser) -> None:
                for attr, target in DATA_LINKS.items():
                    parser.link_arguments(f"data.{attr}", target, apply_on="instantiate")

            def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
                kwargs = super()._prepare_subcommand_kwargs(subcommand)
                if kwargs.get("weights_only") is None and "weights_only" in (
                    self._subcommand_method_arguments.get(subcommand) or ()
                ):
                    kwargs["weights_only"] = True
                return kwargs

        return _SafeCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=list(args) if args is not None else None,
            run=run,
            auto_configure_optimizers=False,
        )


def _usage() -> str:
    lines = [
        "usage: metanet {fit,validate,test,predict,zoo,predict-accuracy,init-weights,generate} ..."
    ]
    lines.append("")
    lines.append(__doc__.strip())
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``metanet`` console script."""
    from_sys_argv = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command = argv[0]
    if command in JOBS:
        module_name, func_name = JOBS[command].split(":")
        job = getattr(importlib.import_module(module_name), func_name)
        return int(job(argv[1:]) or 0)
    if command in LIGHTNING_SUBCOMMANDS or command.startswith("--"):
        # LightningCLI reads sys.argv itself (and warns when handed a copy of it).
        try:
            MetanetCLI(None if from_sys_argv else argv)
        except pickle.UnpicklingError as err:  # a --ckpt_path that is not tensors-only
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            print(f"metanet {command}: error: --ckpt_path holds pickled Python objects that "
                  f"metanet does not load ({reason})", file=sys.stderr)  # fmt: skip
            return 2
        return 0
    print(f"metanet: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
