#!/usr/bin/env bash
# Dataproc initialization action: install fedbucket and its dependencies on every node, from the
# wheelhouse that `make package` built and the deploy step uploaded (gs://<artifacts>/fedbucket/<version>/).
# Nodes have internal IPs only: no PyPI, no NAT. They reach GCS through Private Google Access.
set -euo pipefail
artifacts="$(/usr/share/google/get_metadata_value attributes/fedbucket-artifacts)"
workdir="$(mktemp -d)"
gcloud storage cp --recursive "${artifacts}/wheels" "${workdir}/"
/opt/conda/default/bin/python -m pip install --no-index --find-links "${workdir}/wheels" \
  -r "${workdir}/wheels/requirements-cluster.txt"
/opt/conda/default/bin/python -c "import fedbucket, torch; print('fedbucket', fedbucket.__version__, 'torch', torch.__version__)"
