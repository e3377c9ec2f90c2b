variable "name" {
  description = "Prefix for resource names and the Name tag."
  type        = string
}

variable "vpc_id" {
  description = "ID of the VPC the security groups belong to."
  type        = string
}

variable "vpc_cidr" {
  description = "IPv4 CIDR of the VPC: the only source allowed to reach the data-plane ports and the agents' side of the controller API."
  type        = string
}

variable "admin_cidrs" {
  description = "IPv4 CIDRs allowed to reach the controller API (already validated by the root module)."
  type        = list(string)
}

variable "controller_port" {
  description = "TCP port of the controller API."
  type        = number
}

variable "relay_port" {
  description = "UDP port relays receive market data on."
  type        = number
}

variable "receiver_port_base" {
  description = "First UDP port of the receiver endpoints on a receiver host."
  type        = number
}

variable "receiver_port_count" {
  description = "Number of consecutive UDP ports from receiver_port_base (endpoints per receiver host)."
  type        = number
}

variable "probe_ports" {
  description = "UDP port range of the latency probers (the nodes' ephemeral port range)."
  type = object({
    from = number
    to   = number
  })
}

variable "enable_ssh" {
  description = "Create the SSH security group (TCP 22 from ssh_cidrs)."
  type        = bool
}

variable "ssh_cidrs" {
  description = "IPv4 CIDRs allowed to reach TCP 22 when enable_ssh is true."
  type        = list(string)
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
