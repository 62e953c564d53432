# The ephemeral cluster every round creates. Terraform owns its definition; the DAG creates it
# from the `dataproc_cluster_config` output (written to dags/dataproc_cluster.json by the deploy
# step), so the cluster the DAG creates is exactly the one described here.

resource "google_storage_bucket_object" "init_action" {
  bucket = google_storage_bucket.buckets["artifacts"].name
  name   = "fedbucket/init/install-fedbucket.sh"
  source = "${path.module}/scripts/install-fedbucket.sh"
}

resource "google_dataproc_autoscaling_policy" "secondary" {
  count     = var.dataproc_max_secondary_workers > 0 ? 1 : 0
  project   = var.project_id
  policy_id = "${var.name_prefix}-secondary"
  location  = var.region

  worker_config {
    min_instances = var.dataproc_workers
    max_instances = var.dataproc_workers
  }

  secondary_worker_config {
    min_instances = 0
    max_instances = var.dataproc_max_secondary_workers
  }

  basic_algorithm {
    yarn_config {
      graceful_decommission_timeout = "300s"
      scale_up_factor               = 1.0
      scale_down_factor             = 1.0
    }
  }
}

locals {
  # In the Dataproc API's JSON shape (what DataprocCreateClusterOperator's cluster_config takes).
  dataproc_cluster_config = merge(
    {
      gce_cluster_config = {
        subnetwork_uri   = google_compute_subnetwork.dataproc.self_link
        internal_ip_only = true
        service_account  = google_service_account.dataproc.email
        service_account_scopes = [
          "https://www.googleapis.com/auth/cloud-platform",
        ]
        tags = [local.dataproc_tag]
        shielded_instance_config = {
          enable_secure_boot          = true
          enable_vtpm                 = true
          enable_integrity_monitoring = true
        }
        metadata = {
          "fedbucket-artifacts" = local.artifacts_root
        }
      }
      master_config = {
        num_instances    = 1
        machine_type_uri = var.dataproc_machine_type
        disk_config      = { boot_disk_type = "pd-balanced", boot_disk_size_gb = 100 }
      }
      worker_config = {
        num_instances    = var.dataproc_workers
        machine_type_uri = var.dataproc_machine_type
        disk_config      = { boot_disk_type = "pd-balanced", boot_disk_size_gb = 100 }
      }
      software_config = {
        image_version = var.dataproc_image_version
        properties = {
          "spark:spark.sql.ansi.enabled"                 = "false"
          "spark:spark.driver.maxResultSize"             = "4g"
          "dataproc:dataproc.logging.stackdriver.enable" = "true"
        }
      }
      initialization_actions = [
        {
          executable_file   = "gs://${google_storage_bucket.buckets["artifacts"].name}/${google_storage_bucket_object.init_action.name}"
          execution_timeout = { seconds = 900 }
        },
      ]
      lifecycle_config = {
        idle_delete_ttl = { seconds = var.dataproc_idle_delete_ttl_seconds }
        auto_delete_ttl = { seconds = var.dataproc_auto_delete_ttl_seconds }
      }
    },
    var.dataproc_max_secondary_workers > 0 ? {
      autoscaling_config = { policy_uri = google_dataproc_autoscaling_policy.secondary[0].id }
    } : {},
  )
}
