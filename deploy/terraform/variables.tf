# ---------------------------------------------------------------------------------------------
# Naming and placement
# ---------------------------------------------------------------------------------------------

variable "name" {
  description = "Name of this Jasper deployment: prefix of every resource name, node name and default SSM parameter path."
  type        = string
  default     = "jasper"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,22}[a-z0-9]$", var.name))
    error_message = "name must be 2-24 characters of lower-case letters, digits and dashes, starting with a letter."
  }
}

variable "availability_zone" {
  description = "Availability zone of the subnet and the cluster placement group, e.g. us-east-1a (a zone name, not a zone ID)."
  type        = string

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9][a-z]$", var.availability_zone))
    error_message = "availability_zone must be a zone name such as us-east-1a."
  }
}

variable "ami_id" {
  description = "AMI of every node: Debian 12, Ubuntu 22.04/24.04 or Amazon Linux 2023 with ENA support, for the architecture of the instance types. Given by ID so that planning never calls AWS."
  type        = string

  validation {
    condition     = can(regex("^ami-([0-9a-f]{8}|[0-9a-f]{17})$", var.ami_id))
    error_message = "ami_id must look like ami-0123456789abcdef0."
  }
}

variable "aws_partition" {
  description = "AWS partition of the account (aws, aws-cn or aws-us-gov), used to build ARNs without calling AWS."
  type        = string
  default     = "aws"

  validation {
    condition     = contains(["aws", "aws-cn", "aws-us-gov"], var.aws_partition)
    error_message = "aws_partition must be aws, aws-cn or aws-us-gov."
  }
}

variable "tags" {
  description = "Tags added to every resource that takes tags."
  type        = map(string)
  default     = {}
}

# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------

variable "vpc_cidr" {
  description = "IPv4 CIDR of the VPC created when existing_network is null."
  type        = string
  default     = "10.42.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0)) && !strcontains(var.vpc_cidr, ":")
    error_message = "vpc_cidr must be an IPv4 CIDR block such as 10.42.0.0/16."
  }
}

variable "subnet_cidr" {
  description = "IPv4 CIDR of the subnet created when existing_network is null; it must hold every node plus the 5 addresses AWS reserves."
  type        = string
  default     = "10.42.0.0/22"

  validation {
    condition     = can(cidrhost(var.subnet_cidr, 0)) && !strcontains(var.subnet_cidr, ":")
    error_message = "subnet_cidr must be an IPv4 CIDR block such as 10.42.0.0/22."
  }
}

variable "existing_network" {
  description = "Deploy into an existing VPC and subnet instead of creating them. The CIDRs are given here because reading them from AWS would need a data source at plan time."
  type = object({
    vpc_id      = string
    vpc_cidr    = string
    subnet_id   = string
    subnet_cidr = string
  })
  default = null

  validation {
    condition = var.existing_network == null || (
      can(regex("^vpc-[0-9a-f]+$", var.existing_network.vpc_id)) &&
      can(regex("^subnet-[0-9a-f]+$", var.existing_network.subnet_id)) &&
      can(cidrhost(var.existing_network.vpc_cidr, 0)) &&
      can(cidrhost(var.existing_network.subnet_cidr, 0))
    )
    error_message = "existing_network needs a vpc-... ID, a subnet-... ID and their IPv4 CIDR blocks."
  }
}

variable "assign_public_ip" {
  description = "Give every node a public IPv4 address, so it can download packages through the internet gateway. Inbound traffic stays limited by the security groups. Set false when the subnet of existing_network has a NAT gateway."
  type        = bool
  default     = true

  validation {
    condition     = var.assign_public_ip || var.existing_network != null
    error_message = "The VPC this module creates has no NAT gateway: without public addresses the nodes cannot install packages. Keep assign_public_ip = true or use existing_network."
  }
}

variable "controller_host_number" {
  description = "Host number of the controller's fixed private address inside the subnet (cidrhost). Every node's user data carries this address."
  type        = number
  default     = 10

  validation {
    condition     = var.controller_host_number >= 4 && floor(var.controller_host_number) == var.controller_host_number
    error_message = "controller_host_number must be an integer of at least 4: AWS reserves the first four addresses of a subnet."
  }
}

# ---------------------------------------------------------------------------------------------
# Access
# ---------------------------------------------------------------------------------------------

variable "admin_cidrs" {
  description = "IPv4 CIDRs allowed to reach the controller API from outside the VPC. Empty (the default) means the API is reachable from inside the VPC only."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.admin_cidrs : can(cidrhost(c, 0)) && !strcontains(c, ":")])
    error_message = "Every admin_cidrs entry must be an IPv4 CIDR block such as 203.0.113.0/24."
  }

  validation {
    condition     = var.allow_public_admin_api || alltrue([for c in var.admin_cidrs : !can(regex("/0$", c))])
    error_message = "admin_cidrs must not open the controller API to the whole internet (a /0 block) unless allow_public_admin_api is true."
  }
}

variable "allow_public_admin_api" {
  description = "Allow a /0 block in admin_cidrs. The API is HTTPS with a private CA, guarded by tokens; leave this false."
  type        = bool
  default     = false
}

variable "enable_ssh" {
  description = "Open TCP 22 from ssh_cidrs and attach ssh_key_name. Off by default: use Session Manager instead."
  type        = bool
  default     = false
}

variable "ssh_cidrs" {
  description = "IPv4 CIDRs allowed to reach SSH when enable_ssh is true."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.ssh_cidrs : can(cidrhost(c, 0)) && !strcontains(c, ":") && !can(regex("/0$", c))])
    error_message = "Every ssh_cidrs entry must be an IPv4 CIDR block narrower than /0."
  }

  validation {
    condition     = !var.enable_ssh || length(var.ssh_cidrs) > 0
    error_message = "enable_ssh needs at least one entry in ssh_cidrs."
  }
}

variable "ssh_key_name" {
  description = "Name of an existing EC2 key pair, attached only when enable_ssh is true."
  type        = string
  default     = null
}

variable "enable_session_manager" {
  description = "Attach AmazonSSMManagedInstanceCore to the nodes' role, so operators get a shell through Session Manager with no inbound port."
  type        = bool
  default     = true
}

# ---------------------------------------------------------------------------------------------
# Instances
# ---------------------------------------------------------------------------------------------

variable "controller_instance_type" {
  description = "Instance type of the controller host, which also runs the exchange's publisher. Must be an ENA-capable Nitro type of the c, m or r families, generation 5 to 8 (cluster placement groups exclude burstable types)."
  type        = string
  default     = "c5.2xlarge"

  validation {
    condition     = can(regex("^[cmr][5-8][a-z]*\\.(large|[0-9]*xlarge|metal(-[0-9]+xl)?)$", var.controller_instance_type))
    error_message = "controller_instance_type must be an ENA-capable Nitro type of the c, m or r families, generation 5 to 8 (e.g. c5.2xlarge)."
  }
}

variable "relay_instance_type" {
  description = "Instance type of the relays. The paper's cost model was measured on c5.2xlarge. Same family rules as controller_instance_type."
  type        = string
  default     = "c5.2xlarge"

  validation {
    condition     = can(regex("^[cmr][5-8][a-z]*\\.(large|[0-9]*xlarge|metal(-[0-9]+xl)?)$", var.relay_instance_type))
    error_message = "relay_instance_type must be an ENA-capable Nitro type of the c, m or r families, generation 5 to 8 (e.g. c5.2xlarge)."
  }
}

variable "receiver_instance_type" {
  description = "Instance type of the receiver hosts (market participants' VMs). Same family rules as controller_instance_type."
  type        = string
  default     = "c5.xlarge"

  validation {
    condition     = can(regex("^[cmr][5-8][a-z]*\\.(large|[0-9]*xlarge|metal(-[0-9]+xl)?)$", var.receiver_instance_type))
    error_message = "receiver_instance_type must be an ENA-capable Nitro type of the c, m or r families, generation 5 to 8 (e.g. c5.xlarge)."
  }
}

variable "relay_count" {
  description = "Number of relay instances. For N endpoints with fan-out 10 the tree needs about 1 + 10 + ... + N/10 relays (111 for N = 1000)."
  type        = number
  default     = 3

  validation {
    condition     = var.relay_count >= 1 && var.relay_count <= 1000 && floor(var.relay_count) == var.relay_count
    error_message = "relay_count must be an integer from 1 to 1000."
  }
}

variable "receiver_count" {
  description = "Number of receiver hosts."
  type        = number
  default     = 10

  validation {
    condition     = var.receiver_count >= 1 && var.receiver_count <= 5000 && floor(var.receiver_count) == var.receiver_count
    error_message = "receiver_count must be an integer from 1 to 5000."
  }
}

variable "endpoints_per_receiver" {
  description = "Market-participant endpoints hosted by each receiver host (one UDP port each from receiver_port_base); the paper emulated 10-20 per VM."
  type        = number
  default     = 1

  validation {
    condition     = var.endpoints_per_receiver >= 1 && var.endpoints_per_receiver <= 64 && floor(var.endpoints_per_receiver) == var.endpoints_per_receiver
    error_message = "endpoints_per_receiver must be an integer from 1 to 64."
  }
}

variable "root_volume_size_gb" {
  description = "Size of each node's encrypted gp3 root volume in GiB."
  type        = number
  default     = 16

  validation {
    condition     = var.root_volume_size_gb >= 8 && var.root_volume_size_gb <= 1024
    error_message = "root_volume_size_gb must be from 8 to 1024."
  }
}

# ---------------------------------------------------------------------------------------------
# Daemons
# ---------------------------------------------------------------------------------------------

variable "jasper_package" {
  description = "pip requirement that installs the Jasper package on every node, e.g. a wheel URL or 'jasper-multicast @ git+https://example.org/jasper.git@v0.1.0'."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9._+:/@=<>!~,%# -]*$", var.jasper_package))
    error_message = "jasper_package must be a one-line pip requirement without quotes or shell metacharacters."
  }
}

variable "controller_port" {
  description = "TCP port of the controller API."
  type        = number
  default     = 8080

  validation {
    condition     = var.controller_port >= 1 && var.controller_port <= 65535
    error_message = "controller_port must be from 1 to 65535."
  }
}

variable "relay_port" {
  description = "UDP port relays receive market data on."
  type        = number
  default     = 7000

  validation {
    condition     = var.relay_port >= 1024 && var.relay_port <= 65535
    error_message = "relay_port must be from 1024 to 65535."
  }
}

variable "receiver_port_base" {
  description = "First UDP port of the endpoints on a receiver host; endpoint i listens on receiver_port_base + i."
  type        = number
  default     = 7100

  validation {
    condition     = var.receiver_port_base >= 1024 && var.receiver_port_base + var.endpoints_per_receiver - 1 <= 65535
    error_message = "receiver_port_base must be at least 1024 and leave room for endpoints_per_receiver ports below 65536."
  }

  validation {
    condition = (
      (var.relay_port < var.receiver_port_base || var.relay_port >= var.receiver_port_base + var.endpoints_per_receiver)
    )
    error_message = "The receiver port range must not contain relay_port."
  }
}

variable "probe_ports" {
  description = "UDP range the agents' latency probers use: the nodes' ephemeral port range (net.ipv4.ip_local_port_range is set to it), open to the VPC only."
  type = object({
    from = number
    to   = number
  })
  default = {
    from = 32768
    to   = 60999
  }

  validation {
    condition = (
      var.probe_ports.from >= 1024 && var.probe_ports.to <= 65535 && var.probe_ports.from < var.probe_ports.to &&
      (var.probe_ports.from > max(var.relay_port, var.receiver_port_base + var.endpoints_per_receiver - 1) ||
      var.probe_ports.to < min(var.relay_port, var.receiver_port_base))
    )
    error_message = "probe_ports must be a range within 1024-65535 that lies wholly above or below the relay and receiver ports."
  }
}

variable "fast_path" {
  description = "Data path of relays and receivers: auto (eBPF when the kernel allows, else user space), ebpf or user."
  type        = string
  default     = "auto"

  validation {
    condition     = contains(["auto", "ebpf", "user"], var.fast_path)
    error_message = "fast_path must be auto, ebpf or user."
  }
}

variable "run_publisher" {
  description = "Run the publisher daemon on the controller host (the exchange's side of the tree)."
  type        = bool
  default     = true
}

variable "publisher_stream" {
  description = "Stream id the publisher sends."
  type        = number
  default     = 1

  validation {
    condition     = var.publisher_stream >= 1 && var.publisher_stream <= 4294967295 && floor(var.publisher_stream) == var.publisher_stream
    error_message = "publisher_stream must be an integer from 1 to 2^32 - 1."
  }
}

variable "publisher_rate" {
  description = "Messages per second the publisher sends."
  type        = number
  default     = 100

  validation {
    condition     = var.publisher_rate > 0 && var.publisher_rate <= 1000000
    error_message = "publisher_rate must be above 0 and at most 1000000 messages per second."
  }
}

# ---------------------------------------------------------------------------------------------
# Tokens (SSM Parameter Store)
# ---------------------------------------------------------------------------------------------

variable "admin_token_parameter" {
  description = "Name of the SSM SecureString parameter holding the controller's admin token. Null means /<name>/admin-token."
  type        = string
  default     = null

  validation {
    condition     = var.admin_token_parameter == null || can(regex("^/[A-Za-z0-9_./-]+$", var.admin_token_parameter))
    error_message = "admin_token_parameter must be a path-style SSM parameter name such as /jasper/admin-token."
  }
}

variable "join_token_secret" {
  description = "256-bit secret (e.g. openssl rand -hex 32) from which Terraform derives each node's own one-time join token. Each token goes write-only into its node's SSM SecureString (never into the state); the controller gets only their SHA-256. Keep it like the admin token."
  type        = string
  sensitive   = true
  nullable    = false

  validation {
    condition     = can(regex("^[A-Za-z0-9._~+/=-]{32,}$", var.join_token_secret))
    error_message = "join_token_secret must be at least 32 characters of A-Z a-z 0-9 . _ ~ + / = - (e.g. openssl rand -hex 32)."
  }
}

variable "admin_token" {
  description = "When set, Terraform creates the admin-token SecureString parameter with this value, as a write-only argument that never enters the state. When null, the parameter must already exist."
  type        = string
  default     = null
  sensitive   = true

  validation {
    condition     = var.admin_token == null ? true : can(regex("^[A-Za-z0-9._~+/=-]{32,}$", var.admin_token))
    error_message = "admin_token must be at least 32 characters of A-Z a-z 0-9 . _ ~ + / = - (e.g. openssl rand -hex 32)."
  }
}

variable "token_version" {
  description = "Version of the join tokens and admin_token: write-only values are not compared with the state, so raise this to push a changed admin token to SSM; raising it also issues every node a new join token (and so rebuilds the controller host, whose user data carries their hashes)."
  type        = number
  default     = 1

  validation {
    condition     = var.token_version >= 1 && floor(var.token_version) == var.token_version
    error_message = "token_version must be a positive integer."
  }
}

# ---------------------------------------------------------------------------------------------
# Cost inputs (prices cannot be fetched at plan time)
# ---------------------------------------------------------------------------------------------

variable "on_demand_usd_per_hour" {
  description = "On-demand Linux price per instance hour in USD, by instance type. Defaults: AWS EC2 On-Demand Pricing page, us-east-1, as last known (2024); not fetched here. Override with your region's prices."
  type        = map(number)
  nullable    = false
  default = {
    "c5.large"    = 0.085
    "c5.xlarge"   = 0.17
    "c5.2xlarge"  = 0.34
    "c5.4xlarge"  = 0.68
    "c5n.large"   = 0.108
    "c5n.xlarge"  = 0.216
    "c5n.2xlarge" = 0.432
    "c6i.large"   = 0.085
    "c6i.xlarge"  = 0.17
    "c6i.2xlarge" = 0.34
    "c6in.xlarge" = 0.2268
    "c7i.large"   = 0.08925
    "c7i.xlarge"  = 0.1785
    "c7i.2xlarge" = 0.357
    "m5.large"    = 0.096
    "m5.xlarge"   = 0.192
    "m6i.large"   = 0.096
    "m6i.xlarge"  = 0.192
  }

  validation {
    condition     = alltrue([for p in values(var.on_demand_usd_per_hour) : p >= 0])
    error_message = "Prices must not be negative."
  }
}

variable "ebs_gp3_usd_per_gb_month" {
  description = "gp3 storage price in USD per GB-month (us-east-1, as last known, 2024); converted to hours with 730 hours per month."
  type        = number
  default     = 0.08
}

variable "public_ipv4_usd_per_hour" {
  description = "Price of one public IPv4 address per hour in USD (charged since February 2024)."
  type        = number
  default     = 0.005
}
