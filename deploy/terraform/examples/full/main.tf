# Full Jasper deployment for 1000 market-participant endpoints: one controller and publisher
# host, 111 relays (fan-out 10, depth 3) and 50 receiver hosts with 20 endpoints each. The
# admin token lives in an SSM parameter created beforehand (docs/deploy-aws.md); each node's
# join token is written write-only to its own parameter. No token enters the state.

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
      Example = "full"
    }
  }
}

module "jasper" {
  source = "../.."

  name              = "jasper-full"
  availability_zone = var.availability_zone
  ami_id            = var.ami_id
  jasper_package    = var.jasper_package
  admin_cidrs       = var.admin_cidrs
  join_token_secret = var.join_token_secret

  fast_path = "auto"

  controller_instance_type = var.controller_instance_type
  relay_instance_type      = var.relay_instance_type
  receiver_instance_type   = var.receiver_instance_type
  relay_count              = var.relay_count
  receiver_count           = var.receiver_count
  endpoints_per_receiver   = var.endpoints_per_receiver

  on_demand_usd_per_hour = var.on_demand_usd_per_hour
}
