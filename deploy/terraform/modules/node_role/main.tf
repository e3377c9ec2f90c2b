# Instance identity: lets a node read its own secrets from SSM Parameter Store at boot (and the
# controller host publish the private CA's certificate), so no secret ever sits in user data,
# Terraform outputs or the AMI. Each relay and receiver host gets its own role, whose policy
# names only that node's join token parameter and the public CA certificate.

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "parameters" {
  statement {
    sid       = "ReadJasperParameters"
    actions   = ["ssm:GetParameter"]
    resources = var.read_parameter_arns
  }

  dynamic "statement" {
    for_each = length(var.write_parameter_arns) > 0 ? [var.write_parameter_arns] : []

    content {
      sid       = "WriteJasperParameters"
      actions   = ["ssm:PutParameter"]
      resources = statement.value
    }
  }

  # AmazonSSMManagedInstanceCore (Session Manager) allows ssm:GetParameter(s) on every
  # parameter: without this deny, any node could read every other node's join token, the admin
  # token and the CA key. An explicit deny wins over that allow.
  statement {
    sid           = "NoOtherParameters"
    effect        = "Deny"
    actions       = ["ssm:GetParameter", "ssm:GetParameters", "ssm:GetParametersByPath", "ssm:GetParameterHistory"]
    not_resources = distinct(concat(var.read_parameter_arns, var.write_parameter_arns))
  }
}

resource "aws_iam_role" "this" {
  name               = var.name
  assume_role_policy = data.aws_iam_policy_document.assume.json

  tags = var.tags
}

resource "aws_iam_role_policy" "parameters" {
  name   = "${var.name}-parameters"
  role   = aws_iam_role.this.id
  policy = data.aws_iam_policy_document.parameters.json
}

resource "aws_iam_role_policy_attachment" "session_manager" {
  count = var.enable_session_manager ? 1 : 0

  role       = aws_iam_role.this.name
  policy_arn = "arn:${var.aws_partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_instance_profile" "this" {
  name = var.name
  role = aws_iam_role.this.name

  tags = var.tags
}
