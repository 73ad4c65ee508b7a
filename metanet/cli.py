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


class MetanetCLI:
    """LightningCLI with metanet's defaults: tasks and data modules chosen by class path, and
    ``--ckpt_path`` read tensors-only (``--weights_only false`` is the explicit way to trust a
    checkpoint that needs the full unpickler)."""

    def __new__(cls, args: Sequence[str] | None = None, run: bool = True):
        from lightning.pytorch.cli import LightningCLI

        class _SafeCLI(LightningCLI):
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
