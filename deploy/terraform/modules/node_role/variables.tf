variable "name" {
  description = "Name of the IAM role and instance profile."
  type        = string
}

variable "read_parameter_arns" {
  description = "ARNs of the SSM parameters the instances may read (ssm:GetParameter): the node's own join token, the CA certificate and, on the controller host, the admin token and the CA key."
  type        = list(string)

  validation {
    condition     = length(var.read_parameter_arns) > 0
    error_message = "At least one parameter ARN is needed; a node cannot join the controller without its join token."
  }
}

variable "write_parameter_arns" {
  description = "ARNs of the SSM parameters the instances may write (ssm:PutParameter): the private CA's key and certificate, on the controller host only. Empty for every other node."
  type        = list(string)
  default     = []
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
