# Instance identity: lets a node read its tokens from SSM Parameter Store at boot, so no secret
# ever sits in user data, Terraform outputs or the AMI.

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "read_tokens" {
  statement {
    sid       = "ReadJasperTokens"
    actions   = ["ssm:GetParameter"]
    resources = var.token_parameter_arns
  }
}

resource "aws_iam_role" "this" {
  name               = var.name
  assume_role_policy = data.aws_iam_policy_document.assume.json

  tags = var.tags
}

resource "aws_iam_role_policy" "read_tokens" {
  name   = "${var.name}-read-tokens"
  role   = aws_iam_role.this.id
  policy = data.aws_iam_policy_document.read_tokens.json
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
