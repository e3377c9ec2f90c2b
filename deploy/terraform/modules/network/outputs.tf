output "vpc_id" {
  description = "ID of the VPC."
  value       = aws_vpc.this.id
}

output "subnet_id" {
  description = "ID of the subnet every node lives in."
  value       = aws_subnet.this.id
}
