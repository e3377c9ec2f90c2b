# Security groups: market data moves only inside the VPC; the controller API is reachable from
# the VPC (agents) and from the operator's admin CIDRs; SSH exists only when asked for.

resource "aws_security_group" "data_plane" {
  name        = "${var.name}-data-plane"
  description = "Jasper market data (UDP) between publisher, relays and receivers, VPC only"
  vpc_id      = var.vpc_id

  tags = merge(var.tags, { Name = "${var.name}-data-plane" })
}

resource "aws_vpc_security_group_ingress_rule" "relay_udp" {
  security_group_id = aws_security_group.data_plane.id
  description       = "Relay data port, from inside the VPC only"
  ip_protocol       = "udp"
  from_port         = var.relay_port
  to_port           = var.relay_port
  cidr_ipv4         = var.vpc_cidr
}

resource "aws_vpc_security_group_ingress_rule" "receiver_udp" {
  security_group_id = aws_security_group.data_plane.id
  description       = "Receiver endpoint ports, from inside the VPC only"
  ip_protocol       = "udp"
  from_port         = var.receiver_port_base
  to_port           = var.receiver_port_base + var.receiver_port_count - 1
  cidr_ipv4         = var.vpc_cidr
}

# The agents' latency probers bind ephemeral ports and probe each other directly, so peers
# need the nodes' ephemeral range; the setup script pins the kernel's range to exactly this.
resource "aws_vpc_security_group_ingress_rule" "probe_udp" {
  security_group_id = aws_security_group.data_plane.id
  description       = "Latency probes between agents, from inside the VPC only"
  ip_protocol       = "udp"
  from_port         = var.probe_ports.from
  to_port           = var.probe_ports.to
  cidr_ipv4         = var.vpc_cidr
}

# Path MTU discovery and the latency prober's reachability checks need ICMP between nodes.
resource "aws_vpc_security_group_ingress_rule" "icmp" {
  security_group_id = aws_security_group.data_plane.id
  description       = "ICMP between nodes, from inside the VPC only"
  ip_protocol       = "icmp"
  from_port         = -1
  to_port           = -1
  cidr_ipv4         = var.vpc_cidr
}

resource "aws_vpc_security_group_egress_rule" "data_plane_out" {
  security_group_id = aws_security_group.data_plane.id
  description       = "Outbound: market data to peers, package installs, SSM"
  ip_protocol       = "-1"
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_security_group" "controller" {
  name        = "${var.name}-controller"
  description = "Jasper controller API: agents from the VPC, operators from admin CIDRs"
  vpc_id      = var.vpc_id

  tags = merge(var.tags, { Name = "${var.name}-controller" })
}

resource "aws_vpc_security_group_ingress_rule" "api_from_vpc" {
  security_group_id = aws_security_group.controller.id
  description       = "Controller API for node agents, from inside the VPC"
  ip_protocol       = "tcp"
  from_port         = var.controller_port
  to_port           = var.controller_port
  cidr_ipv4         = var.vpc_cidr
}

resource "aws_vpc_security_group_ingress_rule" "api_from_admin" {
  for_each = toset(var.admin_cidrs)

  security_group_id = aws_security_group.controller.id
  description       = "Controller API for operators"
  ip_protocol       = "tcp"
  from_port         = var.controller_port
  to_port           = var.controller_port
  cidr_ipv4         = each.value
}

resource "aws_security_group" "ssh" {
  count = var.enable_ssh ? 1 : 0

  name        = "${var.name}-ssh"
  description = "SSH from the operator's CIDRs (enabled by variable)"
  vpc_id      = var.vpc_id

  tags = merge(var.tags, { Name = "${var.name}-ssh" })
}

resource "aws_vpc_security_group_ingress_rule" "ssh" {
  for_each = var.enable_ssh ? toset(var.ssh_cidrs) : toset([])

  security_group_id = aws_security_group.ssh[0].id
  description       = "SSH for operators"
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
  cidr_ipv4         = each.value
}
