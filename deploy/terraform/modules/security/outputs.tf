output "data_plane_security_group_id" {
  description = "Security group of every node: data-plane UDP from the VPC."
  value       = aws_security_group.data_plane.id
}

output "controller_security_group_id" {
  description = "Security group of the controller host: API from the VPC and the admin CIDRs."
  value       = aws_security_group.controller.id
}

output "ssh_security_group_ids" {
  description = "The SSH security group as a list: empty unless enable_ssh is true."
  value       = aws_security_group.ssh[*].id
}
