output "instance_ids" {
  description = "Instance IDs, in the order of node_names."
  value       = aws_instance.this[*].id
}

output "private_ips" {
  description = "Private IPv4 addresses, in the order of node_names."
  value       = aws_instance.this[*].private_ip
}

output "public_ips" {
  description = "Public IPv4 addresses (empty strings when none), in the order of node_names."
  value       = aws_instance.this[*].public_ip
}

output "nodes" {
  description = "Map of node name to its private IPv4 address."
  value       = zipmap(var.node_names, aws_instance.this[*].private_ip)
}
