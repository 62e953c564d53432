output "federation_url" {
  description = "The federation root URL for fedbucket clients and the DAG config (bucket = ...)."
  value       = "gs://${google_storage_bucket.buckets["federation"].name}/${var.federation_prefix}"
}

output "artifacts_root" {
  description = "Where `make deploy` uploads the code the clusters run for this fedbucket_version."
  value       = local.artifacts_root
}

output "client_service_accounts" {
  description = "Service account email per client id; give each client a key or workload identity for its own account."
  value       = { for id, sa in google_service_account.client : id => sa.email }
}

output "composer_service_account" {
  description = "The account the DAG runs as."
  value       = google_service_account.composer.email
}

output "dataproc_cluster_config" {
  description = "Cluster config (Dataproc API JSON shape) the DAG creates each round with: terraform output -json dataproc_cluster_config > dags/dataproc_cluster.json."
  value       = local.dataproc_cluster_config
}

output "composer_environment" {
  description = "Name of the Composer environment, if created."
  value       = var.create_composer ? google_composer_environment.federation[0].name : null
}

output "buckets" {
  description = "Bucket names by role: federation, artifacts (the code the clusters run; make deploy ARTIFACTS_BUCKET=gs://<artifacts>) and access_logs."
  value       = { for key, bucket in google_storage_bucket.buckets : key => bucket.name }
}

output "dp_key_secret" {
  description = "Secret Manager version the aggregation job reads the differential-privacy noise key from ([privacy] key_secret); add its value with gcloud secrets versions add."
  value       = "${google_secret_manager_secret.dp_key.id}/versions/latest"
}
