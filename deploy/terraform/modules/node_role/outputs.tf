output "instance_profile_name" {
  description = "Name of the instance profile to attach to the instances."
  value       = aws_iam_instance_profile.this.name
}

output "role_name" {
  description = "Name of the IAM role behind the instance profile."
  value       = aws_iam_role.this.name
}
