variable "name" {
  description = "Name of the IAM role and instance profile."
  type        = string
}

variable "token_parameter_arns" {
  description = "ARNs of the SSM SecureString parameters (tokens) the instances may read at boot."
  type        = list(string)

  validation {
    condition     = length(var.token_parameter_arns) > 0
    error_message = "At least one token parameter ARN is needed; nodes cannot join the controller without the node token."
  }
}

variable "enable_session_manager" {
  description = "Attach AmazonSSMManagedInstanceCore so operators reach instances through Session Manager (no inbound port)."
  type        = bool
}

variable "aws_partition" {
  description = "AWS partition of the account (aws, aws-cn, aws-us-gov), used to build ARNs without calling AWS."
  type        = string
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
