output "controller_url" {
  description = "Controller API URL on its private address (what the nodes use)."
  value       = module.jasper.controller_url
}

output "controller_public_url" {
  description = "Controller API URL on its public address, open only to admin_cidrs."
  value       = module.jasper.controller_public_url
}

output "relay_nodes" {
  description = "Relay node name to private IPv4 address."
  value       = module.jasper.relay_nodes
}

output "receiver_nodes" {
  description = "Receiver host node name to private IPv4 address."
  value       = module.jasper.receiver_nodes
}

output "endpoint_count" {
  description = "Market-participant endpoints in this deployment."
  value       = module.jasper.endpoint_count
}

output "ca_cert_parameter" {
  description = "SSM parameter (name only) where the controller host publishes the CA certificate that verifies the API (HTTPS)."
  value       = module.jasper.ca_cert_parameter
}

output "hourly_cost_usd" {
  description = "Estimated hourly cost in USD from the module's price inputs."
  value       = module.jasper.hourly_cost_usd
}
