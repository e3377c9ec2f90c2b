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

variable "admin_token" {
  description = "Controller admin token; when set, Terraform stores it as an SSM SecureString (write-only, kept out of the state). When null, create /jasper-small/admin-token yourself."
  type        = string
  default     = null
  sensitive   = true
}

variable "relay_count" {
  description = "Number of relays. The tree for 10 endpoints (fan-out 10) needs one; the other two are spares the controller can place instead of a slow (lemon) relay."
  type        = number
  default     = 3
}

variable "receiver_count" {
  description = "Number of receiver hosts (one market participant each)."
  type        = number
  default     = 10
}

variable "endpoints_per_receiver" {
  description = "Endpoints per receiver host."
  type        = number
  default     = 1
}

variable "controller_instance_type" {
  description = "Instance type of the controller and publisher host."
  type        = string
  default     = "c5.xlarge"
}

variable "relay_instance_type" {
  description = "Instance type of the relays."
  type        = string
  default     = "c5.xlarge"
}

variable "receiver_instance_type" {
  description = "Instance type of the receiver hosts."
  type        = string
  default     = "c5.large"
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
