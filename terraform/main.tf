locals {
  labels = merge({ app = "fedbucket", managed-by = "terraform" }, var.labels)

  # Object names (see docs/protocol.md) as IAM conditions see them.
  objects_root   = "projects/_/buckets/${var.bucket_name}/objects/${var.federation_prefix}/"
  dataproc_tag   = "${var.name_prefix}-dataproc"
  artifacts_root = "gs://${google_storage_bucket.artifacts.name}/fedbucket/${var.fedbucket_version}"
}

# ----------------------------------------------------------------------------------------------
# Buckets

resource "google_storage_bucket" "federation" {
  name                        = var.bucket_name
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false
  labels                      = local.labels

  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      age            = var.update_retention_days
      matches_prefix = ["${var.federation_prefix}/updates/"]
    }
    action {
      type = "Delete"
    }
  }

  lifecycle_rule {
    condition {
      age            = var.candidate_retention_days
      matches_prefix = ["${var.federation_prefix}/rounds/"]
      matches_suffix = ["/candidate/model.safetensors"]
    }
    action {
      type = "Delete"
    }
  }

  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_version_retention_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  dynamic "encryption" {
    for_each = var.kms_key_name == null ? [] : [var.kms_key_name]
    content {
      default_kms_key_name = encryption.value
    }
  }

  dynamic "retention_policy" {
    for_each = var.audit_retention_seconds == null ? [] : [var.audit_retention_seconds]
    content {
      retention_period = retention_policy.value
    }
  }

  logging {
    log_bucket = google_storage_bucket.access_logs.name
  }
}

# Code the clusters run: the fedbucket wheel, its dependencies and the Spark jobs (make package).
resource "google_storage_bucket" "artifacts" {
  name                        = "${var.bucket_name}-artifacts"
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  labels                      = local.labels

  versioning {
    enabled = true
  }

  logging {
    log_bucket = google_storage_bucket.access_logs.name
  }
}

resource "google_storage_bucket" "access_logs" {
  name                        = "${var.bucket_name}-access-logs"
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  labels                      = local.labels

  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      age = 365
    }
    action {
      type = "Delete"
    }
  }

  #checkov:skip=CKV_GCP_62:This is the access-log bucket itself; logging it into itself would loop.
}
