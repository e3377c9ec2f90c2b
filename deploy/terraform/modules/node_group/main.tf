# One group of identical Jasper hosts (one role), all in the cluster placement group so that
# every hop of the multicast tree stays on the low-latency network spine.

resource "aws_instance" "this" {
  count = length(var.node_names)

  ami                  = var.ami_id
  instance_type        = var.instance_type
  subnet_id            = var.subnet_id
  private_ip           = length(var.private_ips) > 0 ? var.private_ips[count.index] : null
  placement_group      = var.placement_group
  iam_instance_profile = var.iam_instance_profiles[count.index]
  key_name             = var.key_name

  vpc_security_group_ids      = var.security_group_ids
  associate_public_ip_address = var.associate_public_ip
  ebs_optimized               = true

  # cloud-init runs the script on first boot only; a changed script needs a fresh node.
  user_data_base64            = base64gzip(var.user_data[count.index])
  user_data_replace_on_change = true

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  root_block_device {
    volume_type = "gp3"
    volume_size = var.root_volume_size_gb
    encrypted   = true
  }

  tags = merge(var.tags, {
    Name       = var.node_names[count.index]
    JasperRole = var.role
  })

  lifecycle {
    precondition {
      condition     = length(var.user_data) == length(var.node_names)
      error_message = "user_data needs one entry per node name."
    }
    precondition {
      condition     = length(var.iam_instance_profiles) == length(var.node_names)
      error_message = "iam_instance_profiles needs one entry per node name."
    }
    precondition {
      condition     = length(var.private_ips) == 0 || length(var.private_ips) == length(var.node_names)
      error_message = "private_ips must be empty or have one entry per node name."
    }
  }
}
