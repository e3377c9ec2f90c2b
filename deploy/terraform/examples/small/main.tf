# Small Jasper deployment: one controller and publisher host, 3 relays, 10 receiver hosts.

provider "aws" {
  region = var.region

  # With offline_plan the provider plans from configuration alone (mock credentials), so CI can
  # check the plan without an AWS account.
  skip_credentials_validation = var.offline_plan
  skip_requesting_account_id  = var.offline_plan
  skip_metadata_api_check     = var.offline_plan
  skip_region_validation      = var.offline_plan

  default_tags {
    tags = {
      Project = "jasper"
      Example = "small"
    }
  }
}

module "jasper" {
  source = "../.."

  name              = "jasper-small"
  availability_zone = var.availability_zone
  ami_id            = var.ami_id
  jasper_package    = var.jasper_package
  admin_cidrs       = var.admin_cidrs

  join_token_secret = var.join_token_secret
  admin_token       = var.admin_token

  controller_instance_type = var.controller_instance_type
  relay_instance_type      = var.relay_instance_type
  receiver_instance_type   = var.receiver_instance_type
  relay_count              = var.relay_count
  receiver_count           = var.receiver_count
  endpoints_per_receiver   = var.endpoints_per_receiver

  on_demand_usd_per_hour = var.on_demand_usd_per_hour
}
