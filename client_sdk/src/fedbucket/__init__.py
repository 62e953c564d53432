"""fedbucket: federated learning through one cloud bucket.

This namespace is the client SDK: :class:`Client`, the protocol documents a client reads and
writes, tensor and storage helpers, and the error tree. The package is split by role::

    fedbucket.protocol   layout, documents, tensors, validation, storage, errors (imports nothing above it)
    fedbucket.client     the Client and the client commands of the CLI
    fedbucket.server     config, round lifecycle, aggregation, strategies, evaluation, promotion, reports
    fedbucket.torch      task packages, training, the digits task, `participate` (the ``torch`` extra)
    fedbucket.sim        simulated federations, client partitions, a local GCS emulator

``import fedbucket`` loads the protocol and the client only; the Airflow DAG, its plugins and
the Spark jobs import :mod:`fedbucket.server`.
"""

from fedbucket.client import Client, apply_delta, compute_delta
from fedbucket.protocol.documents import (
    SCHEMA_VERSION,
    ModelManifest,
    ModelPointer,
    ModelSpec,
    RoundPointer,
    RoundReport,
    RoundTask,
    TensorSpec,
    TrainingConfig,
    UpdateManifest,
    UpdateVerdict,
    parse_document,
)
from fedbucket.protocol.errors import (
    ChecksumMismatch,
    ConfigError,
    FedbucketError,
    InvalidIdentifier,
    InvalidManifest,
    LateUpdate,
    MalformedPayload,
    NonFiniteValues,
    NormTooLarge,
    ObjectNotFound,
    ObjectTooLarge,
    PreconditionFailed,
    RoundNotOpen,
    SchemaError,
    SchemaMismatch,
    StaleUpdate,
    StorageError,
    StorageUnavailable,
    UnsupportedSchemaVersion,
    UpdateRejected,
    UpdateTooLarge,
    WaitTimeout,
)
from fedbucket.protocol.layout import LAYOUT, BucketLayout, check_identifier
from fedbucket.protocol.storage import FileStore, GCSStore, ObjectInfo, ObjectStore, open_store
from fedbucket.protocol.tensors import load_tensors, save_tensors, schema_of, tensors_from_bytes, tensors_to_bytes
from fedbucket.protocol.validation import ValidatedUpdate, check_payload, validate_update

__version__ = "0.1.0"

__all__ = [
    "LAYOUT",
    "SCHEMA_VERSION",
    "BucketLayout",
    "ChecksumMismatch",
    "Client",
    "ConfigError",
    "FedbucketError",
    "FileStore",
    "GCSStore",
    "InvalidIdentifier",
    "InvalidManifest",
    "LateUpdate",
    "MalformedPayload",
    "ModelManifest",
    "ModelPointer",
    "ModelSpec",
    "NonFiniteValues",
    "NormTooLarge",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectTooLarge",
    "ObjectStore",
    "PreconditionFailed",
    "RoundNotOpen",
    "RoundPointer",
    "RoundReport",
    "RoundTask",
    "SchemaError",
    "SchemaMismatch",
    "StaleUpdate",
    "StorageError",
    "StorageUnavailable",
    "TensorSpec",
    "TrainingConfig",
    "UnsupportedSchemaVersion",
    "UpdateManifest",
    "UpdateRejected",
    "UpdateTooLarge",
    "UpdateVerdict",
    "WaitTimeout",
    "ValidatedUpdate",
    "apply_delta",
    "check_identifier",
    "check_payload",
    "compute_delta",
    "load_tensors",
    "open_store",
    "parse_document",
    "save_tensors",
    "schema_of",
    "tensors_from_bytes",
    "tensors_to_bytes",
    "validate_update",
]
