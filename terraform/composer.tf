# Optional Cloud Composer 3 environment (create_composer = true). Its image matches the Airflow
# version fedbucket pins; PyPI packages come from requirements-composer.txt (see docs/deploy.md).

resource "google_composer_environment" "federation" {
  count   = var.create_composer ? 1 : 0
  project = var.project_id
  name    = "${var.name_prefix}-composer"
  region  = var.region
  labels  = local.labels

  config {
    software_config {
      image_version = var.composer_image_version
      env_variables = {
        FEDBUCKET_CONFIG = "/home/airflow/gcs/dags/federation.toml"
      }
    }

    node_config {
      service_account = google_service_account.composer.email
      network         = google_compute_network.federation.id
      subnetwork      = google_compute_subnetwork.dataproc.id
    }

    environment_size = "ENVIRONMENT_SIZE_SMALL"
  }
}
