"""metanet: learning in weight space.

Metanetworks read, edit and write the weights of other neural networks. See
docs/architecture.md for the map of modules: ``weightspace`` and ``graph`` turn networks into
data, ``ops`` is the scatter-kernel core, ``nn`` holds the equivariant models, ``hyper`` and
``generate`` write weights, ``zoo`` and ``data`` build and serve populations of trained networks,
``tasks`` holds the LightningModules and ``cli`` the ``metanet`` command.
"""

__version__ = "0.1.0"
