# A root configuration that deploys one federation with the fedbucket module: copy
# terraform.tfvars.example to terraform.tfvars, fill it in, then terraform init && terraform apply.
# In your own infrastructure repository, copy this folder and point `source` at the module.

provider "google" {
  project = var.project_id
  region  = var.region
}

module "fedbucket" {
  source = "../.."

  project_id        = var.project_id
  region            = var.region
  bucket_name       = var.bucket_name
  fedbucket_version = var.fedbucket_version
  clients           = var.clients
  create_composer   = var.create_composer
  labels            = var.labels

  # Every other input has a default; set it here to change it (terraform/README.md lists them), e.g.
  # federation_prefix      = "prod"
  # dataproc_image_version = "3.0-debian12"
  # kms_key_name           = "projects/my-fl-project/locations/europe-west4/keyRings/fl/cryptoKeys/buckets"
}
