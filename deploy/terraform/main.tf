# Jasper in one AWS region: network, cluster placement group, security groups, node identity,
# and the controller, relay and receiver hosts whose first boot installs the project, syncs
# chrony to the Amazon Time Sync Service and starts the daemons.
#
# Control channel: every node enrols with its own one-time join token (an SSM SecureString
# only that node's role may read; the controller is given only the tokens' SHA-256) and then
# talks to the controller over HTTPS, verified against a private CA that the controller host
# makes at first boot and publishes in SSM (docs/deploy-aws.md, "Tokens" and "TLS").

locals {
  create_network = var.existing_network == null

  vpc_id      = local.create_network ? module.network[0].vpc_id : var.existing_network.vpc_id
  vpc_cidr    = local.create_network ? var.vpc_cidr : var.existing_network.vpc_cidr
  subnet_id   = local.create_network ? module.network[0].subnet_id : var.existing_network.subnet_id
  subnet_cidr = local.create_network ? var.subnet_cidr : var.existing_network.subnet_cidr

  # The controller gets a fixed address so every node's user data can name it at plan time.
  controller_private_ip = cidrhost(local.subnet_cidr, var.controller_host_number)
  controller_url        = "https://${local.controller_private_ip}:${var.controller_port}"

  admin_token_parameter = coalesce(var.admin_token_parameter, "/${var.name}/admin-token")
  ca_cert_parameter     = "/${var.name}/tls/ca-cert"
  ca_key_parameter      = "/${var.name}/tls/ca-key"

  controller_name = "${var.name}-controller"
  publisher_name  = "${var.name}-publisher"
  relay_names     = [for i in range(var.relay_count) : format("%s-relay-%03d", var.name, i)]
  receiver_names  = [for i in range(var.receiver_count) : format("%s-receiver-%04d", var.name, i)]

  # Every name that enrols with the controller: each relay and receiver host, and the
  # publisher on the controller host (made even when run_publisher is false, so that it can
  # be started by hand later).
  joining_nodes        = concat(local.relay_names, local.receiver_names, [local.publisher_name])
  join_token_parameter = { for n in local.joining_nodes : n => "/${var.name}/join-token/${n}" }

  # One join token per node. The random provider is not part of this deployment's offline
  # provider set, and Terraform has no random function whose value is known at plan time, so
  # each token is derived from the operator's 256-bit join_token_secret with a nested keyed
  # SHA-256 (no length extension): knowing one node's token reveals nothing of another's.
  # token_version takes part, so raising it issues every node a new token.
  join_token = {
    for n in local.joining_nodes : n => sha256(join(":", [
      "jasper-join-token-v1", var.join_token_secret,
      sha256(join(":", ["jasper-join-token-v1", var.join_token_secret, n, tostring(var.token_version)])),
    ]))
  }
  # What the controller is given (--seed-join-tokens): the SHA-256 of each token, which is
  # what it stores and compares. A hash of a 256-bit token reveals nothing usable.
  join_token_hashes = { for n in local.joining_nodes : n => nonsensitive(sha256(local.join_token[n])) }

  # ARNs built from names, with region and account wildcarded: knowing them would need a call
  # to AWS at plan time.
  parameter_arn_prefix = "arn:${var.aws_partition}:ssm:*:*:parameter/"
  admin_token_arn      = "${local.parameter_arn_prefix}${trimprefix(local.admin_token_parameter, "/")}"
  ca_cert_arn          = "${local.parameter_arn_prefix}${trimprefix(local.ca_cert_parameter, "/")}"
  ca_key_arn           = "${local.parameter_arn_prefix}${trimprefix(local.ca_key_parameter, "/")}"
  join_token_arn       = { for n, p in local.join_token_parameter : n => "${local.parameter_arn_prefix}${trimprefix(p, "/")}" }

  deploy_dir = "${path.module}/.."

  units_by_role = {
    controller = concat(["jasper-controller.service"], var.run_publisher ? ["jasper-publisher.service"] : [])
    relay      = ["jasper-relay.service"]
    receiver   = ["jasper-receiver.service"]
  }

  # Settings every node's setup script reads from /etc/jasper/deploy.env (no secrets here: the
  # tokens are fetched from SSM at boot, each node's by that node only).
  common_env = {
    JASPER_PACKAGE               = var.jasper_package
    JASPER_CONTROLLER_URL        = local.controller_url
    JASPER_CONTROLLER_ADDR       = local.controller_private_ip
    JASPER_CONTROLLER_PORT       = tostring(var.controller_port)
    JASPER_PUBLISHER_NAME        = local.publisher_name
    JASPER_JOIN_TOKEN_PARAMETER  = ""
    JASPER_ADMIN_TOKEN_PARAMETER = local.admin_token_parameter
    JASPER_CA_CERT_PARAMETER     = local.ca_cert_parameter
    JASPER_CA_KEY_PARAMETER      = local.ca_key_parameter
    JASPER_RELAY_PORT            = tostring(var.relay_port)
    JASPER_RECEIVER_PORT_BASE    = tostring(var.receiver_port_base)
    JASPER_ENDPOINTS             = tostring(var.endpoints_per_receiver)
    JASPER_FAST_PATH             = var.fast_path
    JASPER_PROBE_PORTS           = "${var.probe_ports.from} ${var.probe_ports.to}"
    JASPER_PUBLISHER_STREAM      = tostring(var.publisher_stream)
    JASPER_PUBLISHER_RATE        = tostring(var.publisher_rate)
    JASPER_UNITS                 = ""
  }

  nodes = concat(
    [{ role = "controller", name = local.controller_name }],
    [for n in local.relay_names : { role = "relay", name = n }],
    [for n in local.receiver_names : { role = "receiver", name = n }],
  )

  # The setup script without its comment lines (the commented copy is in the repository): the
  # controller's user data also carries a SHA-256 per joining node and must stay under EC2's
  # 16 KiB (docs/deploy-aws.md, "Tokens").
  setup_script = replace(file("${local.deploy_dir}/cloud-init/jasper-node-setup.sh"), "/(?m)^[ \t]*#(?:[^!\n][^\n]*)?\n/", "")

  user_data = {
    for node in local.nodes : node.name => templatefile("${local.deploy_dir}/cloud-init/user-data.sh.tftpl", {
      deploy_env = merge(local.common_env, {
        JASPER_ROLE      = node.role
        JASPER_NODE_NAME = node.name
        JASPER_UNITS     = join(" ", local.units_by_role[node.role])
        # The controller host holds the publisher's join token; every other node its own.
        JASPER_JOIN_TOKEN_PARAMETER = local.join_token_parameter[node.role == "controller" ? local.publisher_name : node.name]
      })
      # Only the controller is given the join tokens, and only as hashes.
      join_token_hashes = node.role == "controller" ? jsonencode(local.join_token_hashes) : ""
      unit_files        = { for u in local.units_by_role[node.role] : u => file("${local.deploy_dir}/systemd/${u}") }
      chrony_conf       = file("${local.deploy_dir}/chrony/chrony.conf")
      phc_conf          = file("${local.deploy_dir}/chrony/jasper-phc.conf")
      setup_script      = local.setup_script
    })
  }

  data_plane_sgs = concat(
    [module.security.data_plane_security_group_id],
    module.security.ssh_security_group_ids,
  )
  ssh_key_name = var.enable_ssh ? var.ssh_key_name : null
}

module "network" {
  source = "./modules/network"
  count  = local.create_network ? 1 : 0

  name                    = var.name
  vpc_cidr                = var.vpc_cidr
  subnet_cidr             = var.subnet_cidr
  availability_zone       = var.availability_zone
  map_public_ip_on_launch = var.assign_public_ip
  tags                    = var.tags
}

module "security" {
  source = "./modules/security"

  name                = var.name
  vpc_id              = local.vpc_id
  vpc_cidr            = local.vpc_cidr
  admin_cidrs         = var.admin_cidrs
  controller_port     = var.controller_port
  relay_port          = var.relay_port
  receiver_port_base  = var.receiver_port_base
  receiver_port_count = var.endpoints_per_receiver
  probe_ports         = var.probe_ports
  enable_ssh          = var.enable_ssh
  ssh_cidrs           = var.ssh_cidrs
  tags                = var.tags
}

# Cluster placement keeps every hop of the tree inside one low-latency network segment; the
# cost model in DESIGN.md (30 µs a level, 2.7 µs a child) assumes it.
resource "aws_placement_group" "this" {
  name     = "${var.name}-cluster"
  strategy = "cluster"

  tags = var.tags
}

# The controller's fixed address is reserved for manual assignment, so that AWS never hands it
# to a relay or receiver launched at the same time.
resource "aws_ec2_subnet_cidr_reservation" "controller" {
  subnet_id        = local.subnet_id
  cidr_block       = "${local.controller_private_ip}/32"
  reservation_type = "explicit"
  description      = "Jasper controller ${local.controller_name}"
}

# One SecureString per node holding its join token; only that node's instance role may read
# it (modules/node_role).
resource "aws_ssm_parameter" "join_token" {
  for_each = local.join_token_parameter

  name        = each.value
  description = "One-time join token of Jasper node ${each.key}"
  type        = "SecureString"
  # Write-only: the provider sends the value to SSM and never stores it in the state.
  value_wo         = local.join_token[each.key]
  value_wo_version = var.token_version

  tags = merge(var.tags, { JasperNode = each.key })
}

resource "aws_ssm_parameter" "admin_token" {
  count = nonsensitive(var.admin_token != null) ? 1 : 0

  name        = local.admin_token_parameter
  description = "Admin token of the Jasper controller API"
  type        = "SecureString"
  # Write-only: the provider sends the value to SSM and never stores it in the state.
  value_wo         = var.admin_token
  value_wo_version = var.token_version

  tags = var.tags
}

# The controller host reads the admin token and the publisher's join token, and keeps the
# private CA: it reads its key back on a rebuild, and writes key and certificate once.
module "controller_role" {
  source = "./modules/node_role"

  name                   = "${var.name}-controller"
  read_parameter_arns    = [local.admin_token_arn, local.join_token_arn[local.publisher_name], local.ca_cert_arn, local.ca_key_arn]
  write_parameter_arns   = [local.ca_cert_arn, local.ca_key_arn]
  enable_session_manager = var.enable_session_manager
  aws_partition          = var.aws_partition
  tags                   = var.tags
}

# A role per relay and receiver host: it reads its own join token and the CA certificate,
# nothing else.
module "node_role" {
  source   = "./modules/node_role"
  for_each = toset(concat(local.relay_names, local.receiver_names))

  name                   = each.key
  read_parameter_arns    = [local.join_token_arn[each.key], local.ca_cert_arn]
  enable_session_manager = var.enable_session_manager
  aws_partition          = var.aws_partition
  tags                   = var.tags
}

module "controller" {
  source = "./modules/node_group"

  role                  = "controller"
  node_names            = [local.controller_name]
  user_data             = [local.user_data[local.controller_name]]
  private_ips           = [local.controller_private_ip]
  instance_type         = var.controller_instance_type
  ami_id                = var.ami_id
  subnet_id             = local.subnet_id
  security_group_ids    = concat(local.data_plane_sgs, [module.security.controller_security_group_id])
  placement_group       = aws_placement_group.this.name
  iam_instance_profiles = [module.controller_role.instance_profile_name]
  key_name              = local.ssh_key_name
  associate_public_ip   = var.assign_public_ip
  root_volume_size_gb   = var.root_volume_size_gb
  tags                  = var.tags

  depends_on = [
    aws_ssm_parameter.join_token,
    aws_ssm_parameter.admin_token,
    aws_ec2_subnet_cidr_reservation.controller,
  ]
}

module "relays" {
  source = "./modules/node_group"

  role                  = "relay"
  node_names            = local.relay_names
  user_data             = [for n in local.relay_names : local.user_data[n]]
  iam_instance_profiles = [for n in local.relay_names : module.node_role[n].instance_profile_name]
  instance_type         = var.relay_instance_type
  ami_id                = var.ami_id
  subnet_id             = local.subnet_id
  security_group_ids    = local.data_plane_sgs
  placement_group       = aws_placement_group.this.name
  key_name              = local.ssh_key_name
  associate_public_ip   = var.assign_public_ip
  root_volume_size_gb   = var.root_volume_size_gb
  tags                  = var.tags

  depends_on = [aws_ssm_parameter.join_token, aws_ec2_subnet_cidr_reservation.controller]
}

module "receivers" {
  source = "./modules/node_group"

  role                  = "receiver"
  node_names            = local.receiver_names
  user_data             = [for n in local.receiver_names : local.user_data[n]]
  iam_instance_profiles = [for n in local.receiver_names : module.node_role[n].instance_profile_name]
  instance_type         = var.receiver_instance_type
  ami_id                = var.ami_id
  subnet_id             = local.subnet_id
  security_group_ids    = local.data_plane_sgs
  placement_group       = aws_placement_group.this.name
  key_name              = local.ssh_key_name
  associate_public_ip   = var.assign_public_ip
  root_volume_size_gb   = var.root_volume_size_gb
  tags                  = var.tags

  depends_on = [aws_ssm_parameter.join_token, aws_ec2_subnet_cidr_reservation.controller]
}

# ---------------------------------------------------------------------------------------------
# Hourly cost from the price inputs
# ---------------------------------------------------------------------------------------------

locals {
  instances_by_type = {
    for t in distinct([var.controller_instance_type, var.relay_instance_type, var.receiver_instance_type]) : t => (
      (var.controller_instance_type == t ? 1 : 0) +
      (var.relay_instance_type == t ? var.relay_count : 0) +
      (var.receiver_instance_type == t ? var.receiver_count : 0)
    )
  }
  instance_count       = 1 + var.relay_count + var.receiver_count
  missing_price_types  = [for t in keys(local.instances_by_type) : t if !contains(keys(var.on_demand_usd_per_hour), t)]
  instances_usd_per_hr = length(local.missing_price_types) > 0 ? null : sum([for t, n in local.instances_by_type : n * var.on_demand_usd_per_hour[t]])
  ebs_usd_per_hr       = local.instance_count * var.root_volume_size_gb * var.ebs_gp3_usd_per_gb_month / 730
  ipv4_usd_per_hr      = var.assign_public_ip ? local.instance_count * var.public_ipv4_usd_per_hour : 0
}
