variable "region" {
  description = "AWS region to deploy into."
  type        = string
  default     = "us-east-1"

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.region))
    error_message = "region must be a region name such as us-east-1."
  }
}

variable "availability_zone" {
  description = "Availability zone of the subnet and the placement group; must be in region."
  type        = string
  default     = "us-east-1a"

  validation {
    condition     = startswith(var.availability_zone, var.region)
    error_message = "availability_zone must be a zone of region (e.g. us-east-1a in us-east-1)."
  }
}

variable "ami_id" {
  description = "AMI ID (Debian 12, Ubuntu 22.04/24.04 or Amazon Linux 2023, x86_64 for the c5 types used here) in region."
  type        = string
}

variable "jasper_package" {
  description = "pip requirement that installs Jasper on the nodes (wheel URL, index name or git URL)."
  type        = string
}

variable "admin_cidrs" {
  description = "IPv4 CIDRs allowed to reach the controller API from outside the VPC (empty: VPC only)."
  type        = list(string)
  default     = []
}

variable "join_token_secret" {
  description = "Secret from which each node's own one-time join token is derived (openssl rand -hex 32). Terraform writes every token write-only to its node's SSM SecureString; the controller gets only their hashes."
  type        = string
  sensitive   = true
}

variable "relay_count" {
  description = "Number of relays: the tree of fan-out 10 and depth 3 over 1000 endpoints needs 1 + 10 + 100 (jasper.tree.tree_shape)."
  type        = number
  default     = 111
}

variable "receiver_count" {
  description = "Number of receiver hosts."
  type        = number
  default     = 50
}

variable "endpoints_per_receiver" {
  description = "Endpoints per receiver host (50 hosts x 20 = 1000 endpoints; the paper emulated 10-20 per VM)."
  type        = number
  default     = 20
}

variable "controller_instance_type" {
  description = "Instance type of the controller and publisher host."
  type        = string
  default     = "c5.2xlarge"
}

variable "relay_instance_type" {
  description = "Instance type of the relays (the paper's cost model was measured on c5.2xlarge)."
  type        = string
  default     = "c5.2xlarge"
}

variable "receiver_instance_type" {
  description = "Instance type of the receiver hosts (20 endpoints each)."
  type        = string
  default     = "c5.xlarge"
}

variable "on_demand_usd_per_hour" {
  description = "On-demand price per instance hour in USD by instance type, for the hourly_cost_usd output; null keeps the module's us-east-1 defaults."
  type        = map(number)
  default     = null
}

variable "offline_plan" {
  description = "Plan without reaching AWS (CI): skip credential, account, metadata and region checks. Use with mock credentials; never for apply."
  type        = bool
  default     = false
}
