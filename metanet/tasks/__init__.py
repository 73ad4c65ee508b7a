"""LightningModules of metanet's jobs, trained with ``metanet fit --config ...``.

* :class:`GeneralizationTask`: regress a checkpoint's test accuracy from its weights (Kendall's
  tau and R² logged; ``test`` writes a predicted-vs-true PNG into the run folder);
* :class:`INRClassificationTask`: classify INRs (digits SIRENs) by their weights;
* weight generators: :class:`~metanet.tasks.flow_generation.FlowGenerationTask` (flow matching),
  :class:`~metanet.tasks.latent_diffusion.LatentDiffusionTask` (p-diff), their shared base and
  in :mod:`metanet.tasks.generation`, :func:`~metanet.tasks.generators.load_generator`;
* :mod:`metanet.tasks.statnn`: the StatNN baseline (weight statistics + gradient-boosted trees);
* :mod:`metanet.tasks.predict_cli`: ``metanet predict-accuracy``.

The scores they log (:func:`~metanet.metrics.kendall_tau`, :func:`~metanet.metrics.r2_score`) live
in :mod:`metanet.metrics`.

Every task takes its metanetwork as ``model``: a factory ``WeightSpaceSpec -> nn.Module`` for
weight-space models (built in ``setup()`` from the data module's spec) or a graph model.
"""

from metanet.tasks._common import TrainingDivergedError
from metanet.tasks.base import MetanetTask
from metanet.tasks.generalization import GeneralizationTask
from metanet.tasks.inr import INRClassificationTask

__all__ = [
    "GeneralizationTask",
    "INRClassificationTask",
    "MetanetTask",
    "TrainingDivergedError",
]
