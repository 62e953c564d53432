# The module validates every value; these only carry them in from terraform.tfvars.

variable "project_id" {
  type        = string
  description = "Google Cloud project that hosts the federation (also the provider's default project)."
}

variable "region" {
  type        = string
  description = "Region of the buckets, the Dataproc clusters and (if created) the Composer environment."
}

variable "bucket_name" {
  type        = string
  description = "Name of the federation bucket (globally unique); <bucket_name>-artifacts and <bucket_name>-access-logs are created too."
}

variable "fedbucket_version" {
  type        = string
  description = "Version of the fedbucket code the clusters install: the version `make package` printed."
}

variable "clients" {
  type = map(object({
    description = optional(string, "")
  }))
  description = "Client organisations, keyed by fedbucket client id; each gets its own service account."
  default     = {}
}

variable "create_composer" {
  type        = bool
  description = "Create a Cloud Composer 3 environment that runs the round DAG."
  default     = false
}

variable "labels" {
  type        = map(string)
  description = "Labels added to every labelled resource and to the clusters the DAG creates."
  default     = {}
}
