output "controller_url" {
  description = "Controller API URL (HTTPS) on its private address, as the nodes use it. Verify it against the CA certificate in ca_cert_parameter."
  value       = local.controller_url
}

output "controller_public_url" {
  description = "Controller API URL (HTTPS; the certificate names this address too) on its public address, reachable only from admin_cidrs (null without a public address)."
  value       = var.assign_public_ip ? "https://${module.controller.public_ips[0]}:${var.controller_port}" : null
}

output "controller_private_ip" {
  description = "Fixed private IPv4 address of the controller host (also the publisher's data address)."
  value       = local.controller_private_ip
}

output "controller_node" {
  description = "Map of the controller host's node name to its private IPv4 address."
  value       = module.controller.nodes
}

output "relay_nodes" {
  description = "Map of relay node name to private IPv4 address."
  value       = module.relays.nodes
}

output "receiver_nodes" {
  description = "Map of receiver host node name to private IPv4 address."
  value       = module.receivers.nodes
}

output "instance_counts" {
  description = "Number of instances per role."
  value = {
    controller = 1
    relay      = var.relay_count
    receiver   = var.receiver_count
  }
}

output "endpoint_count" {
  description = "Market-participant endpoints the deployment hosts (receiver hosts times endpoints per host)."
  value       = var.receiver_count * var.endpoints_per_receiver
}

output "placement_group_name" {
  description = "Name of the cluster placement group every node is in."
  value       = aws_placement_group.this.name
}

output "vpc_id" {
  description = "ID of the VPC the nodes are in."
  value       = local.vpc_id
}

output "subnet_id" {
  description = "ID of the subnet the nodes are in."
  value       = local.subnet_id
}

output "join_token_parameters" {
  description = "Map of node name to the name (not value) of the SSM SecureString parameter holding its one-time join token; only that node's instance role may read it."
  value       = local.join_token_parameter
}

output "ca_cert_parameter" {
  description = "Name of the SSM String parameter where the controller host publishes the private CA's certificate (PEM) at first boot: pass it to jasper's --ca-file to reach the API."
  value       = local.ca_cert_parameter
}

output "admin_token_parameter" {
  description = "Name (not value) of the SSM SecureString parameter holding the admin token."
  value       = local.admin_token_parameter
}

output "hourly_cost_usd" {
  description = "Estimated hourly cost in USD from the price inputs: instances (on demand), gp3 root volumes, public IPv4 addresses and the total. instances and total are null when a price is missing (see missing_price_types)."
  value = {
    instances           = local.instances_usd_per_hr == null ? null : floor(local.instances_usd_per_hr * 10000 + 0.5) / 10000
    ebs                 = floor(local.ebs_usd_per_hr * 10000 + 0.5) / 10000
    public_ipv4         = floor(local.ipv4_usd_per_hr * 10000 + 0.5) / 10000
    total               = local.instances_usd_per_hr == null ? null : floor((local.instances_usd_per_hr + local.ebs_usd_per_hr + local.ipv4_usd_per_hr) * 10000 + 0.5) / 10000
    instances_by_type   = local.instances_by_type
    missing_price_types = local.missing_price_types
  }
}
