resource "google_compute_network" "federation" {
  project                 = var.project_id
  name                    = "${var.name_prefix}-net"
  auto_create_subnetworks = false
}

resource "google_compute_subnetwork" "dataproc" {
  project                  = var.project_id
  name                     = "${var.name_prefix}-dataproc"
  network                  = google_compute_network.federation.id
  region                   = var.region
  ip_cidr_range            = var.subnet_cidr
  private_ip_google_access = true # internal-IP nodes reach GCS and Google APIs without NAT

  log_config {
    aggregation_interval = "INTERVAL_5_MIN"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

# Dataproc nodes talk to each other on all ports (YARN, HDFS, Spark shuffle); nobody else may.
resource "google_compute_firewall" "dataproc_internal" {
  project     = var.project_id
  name        = "${var.name_prefix}-dataproc-internal"
  network     = google_compute_network.federation.id
  direction   = "INGRESS"
  source_tags = [local.dataproc_tag]
  target_tags = [local.dataproc_tag]

  allow {
    protocol = "tcp"
    ports    = ["0-65535"]
  }
  allow {
    protocol = "udp"
    ports    = ["0-65535"]
  }
  allow {
    protocol = "icmp"
  }
}

# SSH only through Identity-Aware Proxy TCP forwarding (its fixed source range), for debugging.
resource "google_compute_firewall" "iap_ssh" {
  project       = var.project_id
  name          = "${var.name_prefix}-iap-ssh"
  network       = google_compute_network.federation.id
  direction     = "INGRESS"
  source_ranges = ["35.235.240.0/20"]
  target_tags   = [local.dataproc_tag]

  allow {
    protocol = "tcp"
    ports    = ["22"]
  }
}
