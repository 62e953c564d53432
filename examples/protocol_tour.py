"""A tour of the bucket protocol against a real GCS emulator: publish, submit, validate.

Starts fake-gcs-server on 127.0.0.1, publishes an initial model, opens a round, lets four clients
submit (two honest, one sending NaN, one sending a pickle renamed to .safetensors) and validates
every update as the server does, printing each verdict. Run: ``make demo`` or
``python examples/protocol_tour.py``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np

from fedbucket import LAYOUT, ModelSpec, TrainingConfig, UpdateRejected, open_store, tensors_to_bytes, validate_update
from fedbucket.client import upload_update
from fedbucket.federation import open_round, publish_model, set_current_model
from fedbucket.schemas import utcnow
from fedbucket.testing import FakeGCSServer
from fedbucket.validation import list_update_manifests


def main() -> None:
    rng = np.random.default_rng(0)
    model = {"fc1.weight": rng.standard_normal((64, 64), dtype=np.float32), "fc1.bias": np.zeros(64, np.float32)}
    with FakeGCSServer(buckets=["federation"]) as gcs, tempfile.TemporaryDirectory() as tmp:
        os.environ["STORAGE_EMULATOR_HOST"] = gcs.endpoint
        store = open_store("gs://federation/tour")
        print(f"fake-gcs-server listening on {gcs.endpoint}; federation at {store.url}")
        manifest = publish_model(store, model, version="init", model=ModelSpec(name="mlp"))
        set_current_model(store, manifest, expected_generation=0)
        print(f"published model 'init' ({manifest.size_bytes} bytes, sha256 {manifest.sha256[:12]}…)")
        task = open_round(store, round_id="r1", opened_at=utcnow(), deadline_seconds=600, training=TrainingConfig())
        print(f"opened round {task.round_id} (deadline {task.deadline:%H:%M:%S} UTC)")

        for client_id in ("hospital-a", "hospital-b"):
            path = Path(tmp) / f"{client_id}.safetensors"
            path.write_bytes(
                tensors_to_bytes({k: 0.01 * rng.standard_normal(v.shape, np.float32) for k, v in model.items()})
            )
            upload_update(store, task, client_id, path, num_examples=int(rng.integers(100, 500)))
            print(f"{client_id}: submitted a delta")
        nan = {k: np.full(v.shape, np.nan, np.float32) for k, v in model.items()}
        for client_id, payload in (("mallory-nan", tensors_to_bytes(nan)), ("mallory-pickle", pickle.dumps(model))):
            # Hostile clients bypass the SDK's own checks and write raw objects.
            sha = hashlib.sha256(payload).hexdigest()
            store.put_bytes(LAYOUT.update_payload(client_id, task.round_id, sha), payload)
            store.put_bytes(
                LAYOUT.update_manifest(client_id, task.round_id),
                (
                    f'{{"kind": "update-manifest", "schema_version": 1, "client_id": "{client_id}", '
                    f'"round_id": "{task.round_id}", "base_model_version": "init", "num_examples": 10, '
                    f'"sha256": "{sha}", "size_bytes": {len(payload)}, "created_at": "{utcnow().isoformat()}"}}'
                ).encode(),
            )
            print(f"{client_id}: wrote a hostile update directly to the bucket")

        print("\nserver-side validation of every committed update:")
        for name in list_update_manifests(store, task.round_id):
            client_id, _ = LAYOUT.parse_update_manifest(name)
            try:
                update = validate_update(store, task, name)
                print(
                    f"  ACCEPT {client_id:15s} {update.manifest.num_examples:4d} examples, L2 norm {update.l2_norm:.3f}"
                )
            except UpdateRejected as exc:
                print(f"  REJECT {client_id:15s} {exc.code}: {exc.reason}")
        print(f"\n{len(list(store.list()))} objects in {store.url}; emulator stopped on exit.")


if __name__ == "__main__":
    main()
