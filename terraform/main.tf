locals {
  labels = merge({ app = "fedbucket", managed-by = "terraform" }, var.labels)

  # Object names (see docs/protocol.md) as IAM conditions see them.
  objects_root   = "projects/_/buckets/${var.bucket_name}/objects/${var.federation_prefix}/"
  dataproc_tag   = "${var.name_prefix}-dataproc"
  artifacts_root = "gs://${google_storage_bucket.buckets["artifacts"].name}/fedbucket/${var.fedbucket_version}"

  access_log_bucket = "${var.bucket_name}-access-logs"

  # The three buckets: only what differs between them is here. What they share — the hardening —
  # is google_storage_bucket.buckets below, one definition that applies to every entry.
  #   log_bucket        where the bucket's usage logs go (null: none)
  #   retention_seconds retention policy (null: none)
  #   lifecycle_rules   Delete rules (on live objects unless with_state = "ARCHIVED"), on top of the
  #                     common noncurrent-version rule
  buckets = {
    # The only meeting point with the clients: models, rounds, updates, reports.
    federation = {
      name              = var.bucket_name
      log_bucket        = local.access_log_bucket
      retention_seconds = var.audit_retention_seconds
      lifecycle_rules = [
        # Client updates: rounds only read them until they close.
        { age = var.update_retention_days, matches_prefix = ["${var.federation_prefix}/updates/"] },
        # Unpromoted candidates. Promoted models live under models/, which no rule expires.
        {
          age            = var.candidate_retention_days
          matches_prefix = ["${var.federation_prefix}/rounds/"]
          matches_suffix = ["/candidate/model.safetensors"]
        },
        # Parts of a candidate or optimiser state the executors wrote but a killed job never joined,
        # and the parts a finished job deleted (kept as noncurrent versions otherwise: a model's
        # size per round for noncurrent_version_retention_days).
        {
          age            = 1
          matches_prefix = ["${var.federation_prefix}/rounds/", "${var.federation_prefix}/state/"]
          matches_suffix = [".part"]
        },
        {
          days_since_noncurrent_time = 1
          with_state                 = "ARCHIVED"
          matches_prefix             = ["${var.federation_prefix}/rounds/", "${var.federation_prefix}/state/"]
          matches_suffix             = [".part"]
        },
      ]
    }

    # Code the clusters run: the fedbucket wheel, its dependencies and the Spark jobs (make package).
    artifacts = {
      name              = "${var.bucket_name}-artifacts"
      log_bucket        = local.access_log_bucket
      retention_seconds = null
      lifecycle_rules   = []
    }

    # Usage logs of the two buckets above, kept a year.
    access_logs = {
      name              = local.access_log_bucket
      log_bucket        = null # the log bucket itself: logging it into itself would loop
      retention_seconds = null
      lifecycle_rules   = [{ age = 365 }]
    }
  }
}

# ----------------------------------------------------------------------------------------------
# Buckets: every property below holds for all three; tests/test_terraform.py asserts it.

resource "google_storage_bucket" "buckets" {
  for_each = local.buckets

  project                     = var.project_id
  name                        = each.value.name
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false
  labels                      = local.labels

  versioning {
    enabled = true
  }

  # Overwritten and deleted versions are kept for recovery and audit, then removed.
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_version_retention_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  dynamic "lifecycle_rule" {
    for_each = each.value.lifecycle_rules
    content {
      condition {
        age                        = try(lifecycle_rule.value.age, null)
        days_since_noncurrent_time = try(lifecycle_rule.value.days_since_noncurrent_time, null)
        with_state                 = try(lifecycle_rule.value.with_state, null)
        matches_prefix             = try(lifecycle_rule.value.matches_prefix, null)
        matches_suffix             = try(lifecycle_rule.value.matches_suffix, null)
      }
      action {
        type = "Delete"
      }
    }
  }

  dynamic "encryption" {
    for_each = var.kms_key_name == null ? [] : [var.kms_key_name]
    content {
      default_kms_key_name = encryption.value
    }
  }

  dynamic "retention_policy" {
    for_each = each.value.retention_seconds == null ? [] : [each.value.retention_seconds]
    content {
      retention_period = retention_policy.value
    }
  }

  # Cloud Storage does not check that the log bucket exists when logging is set, so the three
  # instances need no ordering among themselves.
  dynamic "logging" {
    for_each = each.value.log_bucket == null ? [] : [each.value.log_bucket]
    content {
      log_bucket = logging.value
    }
  }
}

# The buckets were three resources before they became one definition: move their state, so that
# `terraform apply` on an existing deployment changes nothing instead of replacing the buckets.
moved {
  from = google_storage_bucket.federation
  to   = google_storage_bucket.buckets["federation"]
}

moved {
  from = google_storage_bucket.artifacts
  to   = google_storage_bucket.buckets["artifacts"]
}

moved {
  from = google_storage_bucket.access_logs
  to   = google_storage_bucket.buckets["access_logs"]
}
