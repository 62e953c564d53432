"""fedbucket: federated learning through one cloud bucket.

The package is the single source of truth for the bucket layout (:mod:`fedbucket.layout`), the
protocol documents (:mod:`fedbucket.schemas`), tensor (de)serialisation (:mod:`fedbucket.tensors`),
validation of untrusted updates (:mod:`fedbucket.validation`) and storage (:mod:`fedbucket.storage`).
The Airflow DAG, its plugins and the Spark jobs import it; so do clients.
"""

from fedbucket.client import Client, apply_delta, compute_delta
from fedbucket.errors import (
    ChecksumMismatch,
    FedbucketError,
    InvalidIdentifier,
    InvalidManifest,
    LateUpdate,
    MalformedPayload,
    NonFiniteValues,
    NormTooLarge,
    ObjectNotFound,
    PreconditionFailed,
    RoundNotOpen,
    SchemaError,
    SchemaMismatch,
    StaleUpdate,
    StorageError,
    UnsupportedSchemaVersion,
    UpdateRejected,
    UpdateTooLarge,
)
from fedbucket.layout import LAYOUT, BucketLayout, check_identifier
from fedbucket.schemas import (
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
from fedbucket.storage import FileStore, GCSStore, ObjectInfo, ObjectStore, open_store
from fedbucket.tensors import load_tensors, save_tensors, schema_of, tensors_from_bytes, tensors_to_bytes
from fedbucket.validation import ValidatedUpdate, check_payload, validate_update

__version__ = "0.1.0"

__all__ = [
    "LAYOUT",
    "SCHEMA_VERSION",
    "BucketLayout",
    "ChecksumMismatch",
    "Client",
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
    "TensorSpec",
    "TrainingConfig",
    "UnsupportedSchemaVersion",
    "UpdateManifest",
    "UpdateRejected",
    "UpdateTooLarge",
    "UpdateVerdict",
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
