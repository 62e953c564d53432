# Every output of the module, so that `terraform output` works from this folder (docs/deploy.md).

output "federation_url" {
  description = "The federation root URL for fedbucket clients and the DAG config (bucket = ...)."
  value       = module.fedbucket.federation_url
}

output "artifacts_root" {
  description = "Where `make deploy` uploads the code the clusters run for this fedbucket_version."
  value       = module.fedbucket.artifacts_root
}

output "buckets" {
  description = "Bucket names by role: federation, artifacts, access_logs."
  value       = module.fedbucket.buckets
}

output "client_service_accounts" {
  description = "Service account email per client id."
  value       = module.fedbucket.client_service_accounts
}

output "composer_service_account" {
  description = "The account the DAG runs as."
  value       = module.fedbucket.composer_service_account
}

output "dataproc_cluster_config" {
  description = "Cluster config the DAG creates each round with: terraform output -json dataproc_cluster_config > ../../../dags/dataproc_cluster.json."
  value       = module.fedbucket.dataproc_cluster_config
}

output "composer_environment" {
  description = "Name of the Composer environment, if created."
  value       = module.fedbucket.composer_environment
}

output "dp_key_secret" {
  description = "Secret Manager version holding the differential-privacy noise key: [privacy] key_secret in the federation config."
  value       = module.fedbucket.dp_key_secret
}
