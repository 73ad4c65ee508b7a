"""The bundled data providers of :func:`metanet.data.tasks.load_task_data` (``provider:`` key).

* :mod:`~metanet.data.providers.digits` - ``digits``: scikit-learn's 8x8 digits (the default).
* :mod:`~metanet.data.providers.dataset` - ``dataset``: any ``torch.utils.data.Dataset`` by
  ``class_path`` + ``init_args`` (e.g. torchvision's MNIST / CIFAR on disk).
* :mod:`~metanet.data.providers.tensors` - ``tensors``: ``.pt`` / ``.npz`` / ``.npy`` /
  ``.safetensors`` files (tensors only, never pickle).
* :mod:`~metanet.data.providers.image_folder` - ``image_folder``: one subfolder per class.
* :mod:`~metanet.data.providers.glyphs` - ``glyphs``: characters rendered offline from the fonts
  matplotlib ships, under random affine transforms and stroke widths (seeded).
* :mod:`~metanet.data.providers.signals` - ``signals``: any of the above as coordinate -> value
  signals for INRs (:class:`~metanet.data.providers.signals.SignalData`).

Shared by the pool-splitting providers (``dataset``, ``tensors``, ``image_folder``):
``test_fraction`` (0.2 when no test split is given), ``val_fraction`` (0), ``split_seed`` (0),
``target_kind`` (``classes`` | ``regression``; default: integer labels -> classes) and
``num_classes`` (default: the class names, else the largest label + 1). Helpers for writing a
provider: :class:`~metanet.data.providers.config.ProviderConfig` and
:func:`~metanet.data.providers.assemble.assemble_task`.
"""

from metanet.data.providers import dataset, digits, glyphs, image_folder, signals, tensors  # noqa: F401,E501
