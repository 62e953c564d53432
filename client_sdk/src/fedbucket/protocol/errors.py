"""The errors fedbucket raises. Catch :class:`FedbucketError` to catch them all.

::

    FedbucketError
    ├── StorageError                  the bucket could not be read or written
    │   ├── ObjectNotFound            no object at that name
    │   ├── PreconditionFailed        compare-and-swap lost: the object changed meanwhile
    │   ├── ObjectTooLarge            an object is larger than its reader's bound
    │   └── StorageUnavailable        the endpoint kept failing; gave up after the retry timeout
    ├── SchemaError                   a JSON document is not a valid protocol document
    │   └── UnsupportedSchemaVersion  a document of a protocol version this code does not speak
    ├── ConfigError                   invalid settings: config file, run parameters, strategy options
    │   └── PrivacyBudgetExceeded     a round (or local training) would spend more ε than its budget
    ├── UpdateRejected                an untrusted update failed validation (``.code``, ``.reason``)
    │   ├── InvalidIdentifier         client or round id unsafe or not matching the object path
    │   ├── InvalidManifest           the update manifest is not a valid protocol document
    │   ├── UpdateTooLarge            payload larger than the round allows
    │   ├── MalformedPayload          not a well-formed safetensors file
    │   ├── SchemaMismatch            tensor names, shapes or dtypes differ from the round's schema
    │   ├── NonFiniteValues           NaN or infinity in the update
    │   ├── NormTooLarge              L2 norm above the round's hard limit
    │   ├── ChecksumMismatch          payload bytes differ from the manifest's sha256
    │   ├── StaleUpdate               made against another base model than the round's
    │   ├── LateUpdate                committed after the round's deadline
    │   ├── InvalidEvaluation         a client evaluation's scores are inconsistent or out of bounds
    │   ├── ParticipationCapReached   DP: the client already took part in its maximum of rounds
    │   └── NotSampled                DP: the round's secret Poisson draw left the update out
    ├── RoundNotOpen                  no open round, or the round closed / passed its deadline
    └── WaitTimeout                   no round opened within the time a caller was willing to wait

Foreign failures (``OSError`` from a file store, ``google.api_core`` errors, ``RetryError``) are
translated at the storage boundary; nothing else escapes the public API. ``ConfigError`` is also a
``ValueError`` and ``WaitTimeout`` a ``TimeoutError``, so generic handlers keep working.
"""

from __future__ import annotations

from datetime import datetime


class FedbucketError(Exception):
    """Base class of every error fedbucket raises."""


class StorageError(FedbucketError):
    """The bucket could not be read or written."""


class ObjectNotFound(StorageError):
    """No object exists at the given name."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the object's generation was not the one expected."""


class ObjectTooLarge(StorageError):
    """An object is larger than the reader accepts (read no further than the bound)."""


class StorageUnavailable(StorageError):
    """The storage endpoint kept failing (connection refused, 5xx, timeouts) until the retry
    timeout ran out."""


class ConfigError(FedbucketError, ValueError):
    """Settings are invalid: a config file, a run's parameters or a strategy's options."""


class PrivacyBudgetExceeded(ConfigError):
    """Spending what was asked would take ε past the budget: a round the publish step refuses to
    open, or local DP-SGD training a client refuses to start. The message says by how much and
    what to change."""


class WaitTimeout(FedbucketError, TimeoutError):
    """Waiting for something in the bucket (a round to open) took longer than allowed."""


class SchemaError(FedbucketError):
    """A JSON document does not validate against its protocol model."""


class UnsupportedSchemaVersion(SchemaError):
    """A document declares a ``schema_version`` this code does not understand."""


class RoundNotOpen(FedbucketError):
    """There is no open round, or the round is closed or past its deadline."""


class UpdateRejected(FedbucketError):
    """An update failed validation.

    ``code`` is a stable machine-readable token (it goes into round reports and metrics);
    ``reason`` is the human explanation.
    """

    code: str = "rejected"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code}: {self.reason}"


class InvalidIdentifier(UpdateRejected):
    code = "invalid_identifier"


class InvalidManifest(UpdateRejected):
    code = "invalid_manifest"


class UpdateTooLarge(UpdateRejected):
    code = "too_large"


class MalformedPayload(UpdateRejected):
    code = "malformed_payload"


class SchemaMismatch(UpdateRejected):
    code = "schema_mismatch"


class NonFiniteValues(UpdateRejected):
    code = "non_finite"


class NormTooLarge(UpdateRejected):
    code = "norm_too_large"


class ChecksumMismatch(UpdateRejected):
    code = "checksum_mismatch"


class StaleUpdate(UpdateRejected):
    code = "stale_base"


class LateUpdate(UpdateRejected):
    code = "late"
    committed_at: datetime | None = None  # the store's commit time that made it late


class InvalidEvaluation(UpdateRejected):
    code = "invalid_evaluation"


class ParticipationCapReached(UpdateRejected):
    """Differential privacy: the client was already charged for the federation's
    ``max_participations`` rounds, so its update is not read (docs/privacy.md)."""

    code = "participation_cap"


class NotSampled(UpdateRejected):
    """Differential privacy with server-side Poisson subsampling: the round's secret draw left this
    update out before its contents were read (docs/privacy.md)."""

    code = "not_sampled"


class NotInSecureSum(UpdateRejected):
    """Secure aggregation: the update came from a client whose phase-2 shares were not delivered,
    so its masks could never be removed; it was not read (docs/privacy.md)."""

    code = "not_in_secure_sum"
