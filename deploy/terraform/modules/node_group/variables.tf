variable "role" {
  description = "What the instances do: controller (controller and publisher), relay or receiver."
  type        = string

  validation {
    condition     = contains(["controller", "relay", "receiver"], var.role)
    error_message = "role must be controller, relay or receiver."
  }
}

variable "node_names" {
  description = "Node name of each instance, as registered with the controller; one instance per name."
  type        = list(string)
}

variable "user_data" {
  description = "Rendered cloud-init user data (a shell script) per instance, in the order of node_names; gzipped here."
  type        = list(string)

  validation {
    condition     = alltrue([for u in var.user_data : length(base64gzip(u)) <= 21848])
    error_message = "Gzipped user data must stay under the EC2 limit of 16 KiB before base64 (21848 base64 characters)."
  }
}

variable "private_ips" {
  description = "Fixed private IPv4 address per instance, in the order of node_names; empty list for addresses chosen by AWS."
  type        = list(string)
  default     = []
}

variable "instance_type" {
  description = "EC2 instance type (validated as an ENA-capable Nitro type by the root module)."
  type        = string
}

variable "ami_id" {
  description = "AMI of every instance in the group."
  type        = string
}

variable "subnet_id" {
  description = "Subnet of the instances."
  type        = string
}

variable "security_group_ids" {
  description = "Security groups of the instances."
  type        = list(string)
}

variable "placement_group" {
  description = "Name of the cluster placement group every instance joins."
  type        = string
}

variable "iam_instance_profiles" {
  description = "Instance profile per instance, in the order of node_names: each lets its node read its own join token from SSM."
  type        = list(string)
}

variable "key_name" {
  description = "EC2 key pair for SSH, or null for none."
  type        = string
  default     = null
}

variable "associate_public_ip" {
  description = "Give each instance a public IPv4 address (outbound installs through the internet gateway)."
  type        = bool
}

variable "root_volume_size_gb" {
  description = "Size of the encrypted gp3 root volume in GiB."
  type        = number
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
