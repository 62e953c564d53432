# Least privilege, no default compute service account, no primitive roles.

resource "google_service_account" "composer" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-composer"
  display_name = "fedbucket: Airflow (Composer) running the round DAG"
}

resource "google_service_account" "dataproc" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-dataproc"
  display_name = "fedbucket: Dataproc nodes running aggregation and evaluation"
}

resource "google_service_account" "client" {
  for_each     = var.clients
  project      = var.project_id
  account_id   = "${var.name_prefix}-c-${each.key}"
  display_name = "fedbucket client ${each.key}"
  description  = each.value.description
}

# --- Composer: runs the DAG, creates and deletes clusters that run as the Dataproc account.
resource "google_project_iam_member" "composer_worker" {
  #checkov:skip=CKV_GCP_49:Composer requires roles/composer.worker on the environment's own service account; this account is dedicated to the environment.
  project = var.project_id
  role    = "roles/composer.worker"
  member  = google_service_account.composer.member
}

resource "google_project_iam_member" "composer_dataproc_editor" {
  project = var.project_id
  role    = "roles/dataproc.editor"
  member  = google_service_account.composer.member
}

resource "google_service_account_iam_member" "composer_acts_as_dataproc" {
  service_account_id = google_service_account.dataproc.name
  role               = "roles/iam.serviceAccountUser"
  member             = google_service_account.composer.member
}

resource "google_storage_bucket_iam_member" "composer_federation" {
  bucket = google_storage_bucket.buckets["federation"].name
  role   = "roles/storage.objectUser" # publish rounds, freeze them, promote, write reports
  member = google_service_account.composer.member
}

# --- Dataproc nodes: read updates and models, write candidates, state and reports.
resource "google_project_iam_member" "dataproc_worker" {
  project = var.project_id
  role    = "roles/dataproc.worker"
  member  = google_service_account.dataproc.member
}

resource "google_storage_bucket_iam_member" "dataproc_federation" {
  bucket = google_storage_bucket.buckets["federation"].name
  role   = "roles/storage.objectUser"
  member = google_service_account.dataproc.member
}

resource "google_storage_bucket_iam_member" "dataproc_artifacts" {
  bucket = google_storage_bucket.buckets["artifacts"].name
  role   = "roles/storage.objectViewer"
  member = google_service_account.dataproc.member
}

# --- Clients: write (and replace) only under updates/<client>/, read only what they need.
# IAM conditions on object names; none of these grants storage.objects.list on the bucket, so a
# client can neither list the bucket nor read another client's update.
resource "google_storage_bucket_iam_member" "client_own_updates" {
  for_each = var.clients
  bucket   = google_storage_bucket.buckets["federation"].name
  role     = "roles/storage.objectUser"
  member   = google_service_account.client[each.key].member

  condition {
    title       = "own-updates-${each.key}"
    description = "Create, replace and read objects under updates/${each.key}/ only."
    expression  = "resource.name.startsWith(\"${local.objects_root}updates/${each.key}/\")"
  }
}

resource "google_storage_bucket_iam_member" "client_read_round" {
  for_each = var.clients
  bucket   = google_storage_bucket.buckets["federation"].name
  role     = "roles/storage.objectViewer"
  member   = google_service_account.client[each.key].member

  condition {
    title       = "read-models-and-tasks-${each.key}"
    description = "Read promoted models, the pointers, round and evaluation tasks, round candidates and secure-aggregation setups and rosters."
    expression = join(" || ", [
      "resource.name.startsWith(\"${local.objects_root}models/\")",
      "resource.name == \"${local.objects_root}rounds/current.json\"",
      "(resource.name.startsWith(\"${local.objects_root}rounds/\") && resource.name.endsWith(\"/task.json\"))",
      # Federated evaluation: the candidate clients score and what to score it against. Not round
      # reports: they name every client, its example count and its rejections.
      "(resource.name.startsWith(\"${local.objects_root}rounds/\") && resource.name.endsWith(\"/evaluation-task.json\"))",
      "(resource.name.startsWith(\"${local.objects_root}rounds/\") && resource.name.endsWith(\"/candidate/model.safetensors\"))",
      # Secure aggregation: the round's setup (public keys, graph, threshold) and the two rosters.
      # A client's sealed shares reach it in its own inbox (updates/<client>/...); nobody else's.
      "(resource.name.startsWith(\"${local.objects_root}rounds/\") && resource.name.endsWith(\"/secagg-setup.json\"))",
      "(resource.name.startsWith(\"${local.objects_root}rounds/\") && resource.name.endsWith(\"/secagg-shared.json\"))",
      "(resource.name.startsWith(\"${local.objects_root}rounds/\") && resource.name.endsWith(\"/secagg-masked.json\"))",
    ])
  }
}

# --- Cloud Storage usage-log delivery: with uniform bucket-level access the log writer needs an
# IAM role on the log bucket (ACLs do not apply). Create-only, on that bucket alone.
resource "google_storage_bucket_iam_member" "access_log_delivery" {
  bucket = google_storage_bucket.buckets["access_logs"].name
  role   = "roles/storage.objectCreator"
  member = "group:cloud-storage-analytics@google.com"
}

# --- Differential privacy: the server's noise key (docs/privacy.md). Terraform creates the secret and
# lets only the Dataproc account read it; the value (64 hex digits) is added out of band, so it never
# enters Terraform state or the repo:
#   python -c 'import secrets; print(secrets.token_hex(32))' | gcloud secrets versions add <name> --data-file=-
resource "google_secret_manager_secret" "dp_key" {
  project   = var.project_id
  secret_id = "${var.name_prefix}-dp-noise-key"
  labels    = var.labels
  replication {
    user_managed {
      replicas {
        location = var.region
      }
    }
  }
}

resource "google_secret_manager_secret_iam_member" "dataproc_reads_dp_key" {
  project   = var.project_id
  secret_id = google_secret_manager_secret.dp_key.secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = google_service_account.dataproc.member
}
