variable "project_id" {
  type        = string
  description = "Google Cloud project that hosts the federation."

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be a Google Cloud project id (not its name or number): 6-30 lowercase letters, digits and hyphens, starting with a letter, e.g. my-fl-project."
  }
}

variable "region" {
  type        = string
  description = "Region of the bucket, the Dataproc clusters and (if created) the Composer environment, e.g. europe-west4."

  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]$", var.region))
    error_message = "region must be a region, not a zone or multi-region: e.g. europe-west4 or us-central1."
  }
}

variable "name_prefix" {
  type        = string
  description = "Prefix of every resource name (service accounts, network, buckets)."
  default     = "fedbucket"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,9}$", var.name_prefix))
    error_message = "name_prefix: 2-10 lowercase letters, digits or hyphens, starting with a letter (it prefixes service account ids, which are at most 30 characters)."
  }
}

variable "bucket_name" {
  type        = string
  description = "Name of the federation bucket (globally unique). The DAG and the clients use gs://<bucket_name>/<federation_prefix>. The module also creates <bucket_name>-artifacts and <bucket_name>-access-logs."

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9_-]{1,49}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name: 3-51 lowercase letters, digits, hyphens or underscores, starting and ending with a letter or digit (51, not 63: <bucket_name>-access-logs must fit in 63; no dots: they complicate TLS and domain verification)."
  }
}

variable "federation_prefix" {
  type        = string
  description = "Object prefix of the federation inside the bucket (no leading or trailing slash), e.g. \"prod\"."
  default     = "prod"

  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", var.federation_prefix))
    error_message = "federation_prefix must be one path segment of 1-63 characters from A-Z a-z 0-9 _ . - (a fedbucket identifier)."
  }
}

variable "clients" {
  type = map(object({
    description = optional(string, "")
  }))
  description = "Client organisations, keyed by fedbucket client id. Each gets a service account confined to its own update prefix."
  default     = {}

  validation {
    condition     = alltrue([for id in keys(var.clients) : can(regex("^[a-z0-9][a-z0-9-]{0,15}$", id))])
    error_message = "client ids: 1-16 lowercase letters, digits or hyphens, starting with a letter or digit (they become part of service account ids, <name_prefix>-c-<id>, and of object paths)."
  }
}

variable "update_retention_days" {
  type        = number
  description = "Client updates (updates/...) are deleted this many days after upload. Rounds only read them until they close."
  default     = 30

  validation {
    condition     = var.update_retention_days >= 1 && var.update_retention_days <= 3650
    error_message = "update_retention_days must be between 1 and 3650; keep it longer than a round lasts (updates are read until the round closes)."
  }
}

variable "candidate_retention_days" {
  type        = number
  description = "Aggregated candidates (rounds/*/candidate/model.safetensors) are deleted after this many days. Promoted models live under models/ and are never expired by these rules."
  default     = 90

  validation {
    condition     = var.candidate_retention_days >= 1
    error_message = "candidate_retention_days must be at least 1 (days)."
  }
}

variable "noncurrent_version_retention_days" {
  type        = number
  description = "Overwritten or deleted object versions are kept this many days for recovery and audit, in all three buckets (they are versioned)."
  default     = 30

  validation {
    condition     = var.noncurrent_version_retention_days >= 1
    error_message = "noncurrent_version_retention_days must be at least 1 (days)."
  }
}

variable "kms_key_name" {
  type        = string
  description = "Optional Cloud KMS key (projects/.../cryptoKeys/...) for customer-managed encryption of all three buckets (federation, artifacts, access logs). The project's Cloud Storage service agent needs roles/cloudkms.cryptoKeyEncrypterDecrypter on it. null = Google-managed keys."
  default     = null

  validation {
    condition     = var.kms_key_name == null || can(regex("^projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+$", var.kms_key_name))
    error_message = "kms_key_name must be a full key name: projects/P/locations/L/keyRings/R/cryptoKeys/K."
  }
}

variable "audit_retention_seconds" {
  type        = number
  description = "Optional retention policy on the federation bucket: objects cannot be deleted or replaced for this many seconds. Note: it also blocks clients from replacing a manifest within a round. null = no retention policy."
  default     = null

  validation {
    condition     = var.audit_retention_seconds == null || try(var.audit_retention_seconds > 0, false)
    error_message = "audit_retention_seconds must be a positive number of seconds, or null for no retention policy."
  }
}

variable "subnet_cidr" {
  type        = string
  description = "CIDR of the subnet the Dataproc clusters run in (internal IPs only)."
  default     = "10.40.0.0/20"

  validation {
    condition     = can(cidrhost(var.subnet_cidr, 0))
    error_message = "subnet_cidr must be an IPv4 CIDR block such as 10.40.0.0/20."
  }
}

variable "dataproc_image_version" {
  type        = string
  description = "Dataproc image. 2.2-debian12 and 2.3-debian12 run Spark 3.5, 3.0 runs Spark 4; the fedbucket jobs run on both (tests/test_spark_compat.py)."
  default     = "2.2-debian12"

  validation {
    condition     = can(regex("^(2\\.2|2\\.3)-debian12$|^3\\.0-debian12$", var.dataproc_image_version))
    error_message = "dataproc_image_version must be 2.2-debian12, 2.3-debian12 or 3.0-debian12 (Python 3.11, Spark 3.5 or 4)."
  }
}

variable "dataproc_machine_type" {
  type        = string
  description = "Machine type of the Dataproc master and workers."
  default     = "e2-standard-4"

  validation {
    condition     = can(regex("^[a-z][a-z0-9]*-(standard|highmem|highcpu)-[0-9]+$", var.dataproc_machine_type))
    error_message = "dataproc_machine_type must be a predefined machine type such as e2-standard-4 or n2-highmem-8."
  }
}

variable "dataproc_workers" {
  type        = number
  description = "Primary workers of each ephemeral cluster."
  default     = 2

  validation {
    condition     = var.dataproc_workers >= 2 && var.dataproc_workers <= 100
    error_message = "dataproc_workers must be between 2 and 100 (Dataproc needs at least 2 primary workers)."
  }
}

variable "dataproc_idle_delete_ttl_seconds" {
  type        = number
  description = "Backstop: a cluster idle this long is deleted by Dataproc even if the DAG's teardown never ran."
  default     = 1800

  validation {
    condition     = var.dataproc_idle_delete_ttl_seconds >= 600
    error_message = "dataproc_idle_delete_ttl_seconds must be at least 600 (Dataproc's minimum)."
  }
}

variable "dataproc_auto_delete_ttl_seconds" {
  type        = number
  description = "Backstop: every cluster is deleted this long after creation, whatever it is doing."
  default     = 14400

  validation {
    condition     = var.dataproc_auto_delete_ttl_seconds >= 600
    error_message = "dataproc_auto_delete_ttl_seconds must be at least 600."
  }
}

variable "dataproc_max_secondary_workers" {
  type        = number
  description = "If > 0, an autoscaling policy lets each cluster add up to this many secondary (preemptible) workers."
  default     = 0

  validation {
    condition     = var.dataproc_max_secondary_workers >= 0
    error_message = "dataproc_max_secondary_workers cannot be negative; 0 means no autoscaling policy."
  }
}

variable "fedbucket_version" {
  type        = string
  description = "Version of the fedbucket code the clusters install (artifacts under gs://<artifacts bucket>/fedbucket/<version>/, uploaded by `make package` and the deploy step)."

  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9_.+-]{0,62}$", var.fedbucket_version))
    error_message = "fedbucket_version must be a short version string such as 0.1.0 or 0.1.0+g1a2b3c4."
  }
}

variable "create_composer" {
  type        = bool
  description = "Create a Cloud Composer 3 environment that runs the round DAG. Off by default: you may already have one."
  default     = false
}

variable "composer_image_version" {
  type        = string
  description = "Composer image; must match the Airflow version pinned in requirements.txt (3.2.2)."
  default     = "composer-3-airflow-3.2.2-build.2"

  validation {
    condition     = can(regex("^composer-3-airflow-3\\.2\\.2(-build\\.[0-9]+)?$", var.composer_image_version))
    error_message = "composer_image_version must be a composer-3-airflow-3.2.2 image (the Airflow version fedbucket pins)."
  }
}

variable "labels" {
  type        = map(string)
  description = "Labels added to every labelled resource and to the clusters the DAG creates."
  default     = {}

  validation {
    condition     = alltrue([for k, v in var.labels : can(regex("^[a-z][a-z0-9_-]{0,62}$", k)) && can(regex("^[a-z0-9_-]{0,63}$", v))])
    error_message = "label keys and values: lowercase letters, digits, _ and -, at most 63 characters; keys start with a letter."
  }
}
