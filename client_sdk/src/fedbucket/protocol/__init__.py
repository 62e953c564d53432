"""The bucket protocol: everything both sides of a federation must agree on.

- :mod:`.layout` — where every object lives (the only place that spells a path);
- :mod:`.documents` — the JSON documents (``kind`` + ``schema_version``), parsed strictly, and
  their read/write helpers;
- :mod:`.tensors` — safetensors I/O with a defensive header parser;
- :mod:`.validation` — the checks every untrusted update goes through (client and server run
  the same code);
- :mod:`.storage` — ``file://`` and ``gs://`` object stores with the same guarantees;
- :mod:`.errors` — the one error tree (catch :class:`FedbucketError`).

Invariant: this package imports nothing from ``fedbucket.client``, ``fedbucket.server``,
``fedbucket.torch`` or ``fedbucket.sim`` (an import-linter contract in ``make lint`` checks it).
"""
