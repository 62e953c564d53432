# A callable module: no provider block here. The caller configures the google provider (see
# examples/basic); every resource names var.project_id itself, so the provider's default project
# does not matter.
terraform {
  required_version = ">= 1.5.0"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 6.10.0, < 7.0.0"
    }
  }
}
