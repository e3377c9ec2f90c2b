variable "name" {
  description = "Prefix for resource names and the Name tag."
  type        = string
}

variable "vpc_cidr" {
  description = "IPv4 CIDR block of the new VPC."
  type        = string

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0))
    error_message = "vpc_cidr must be an IPv4 CIDR block such as 10.42.0.0/16."
  }
}

variable "subnet_cidr" {
  description = "IPv4 CIDR block of the one subnet, inside vpc_cidr; every node lives in it."
  type        = string

  validation {
    condition     = can(cidrhost(var.subnet_cidr, 0))
    error_message = "subnet_cidr must be an IPv4 CIDR block such as 10.42.1.0/24."
  }
}

variable "availability_zone" {
  description = "Availability zone of the subnet, e.g. us-east-1a. A cluster placement group lives in one zone."
  type        = string
}

variable "map_public_ip_on_launch" {
  description = "Give instances in the subnet a public IPv4 address (for package downloads through the internet gateway)."
  type        = bool
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
