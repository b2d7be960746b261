# An example Packer template that bakes bootagent into an AMI. It installs the
# package, puts the organisation's validator key and the baked config in
# place, and runs `bootagent clean` last, so that every instance launched
# from the AMI registers as itself. It needs Packer's amazon plugin
# (`packer plugins install` it, or `packer init` with your own
# required_plugins block).
#
#   make deb ARCH=amd64        # or ARCH=arm64 for a Graviton image
#   packer build -var source_ami=ami-0123456789abcdef0 \
#     -var package=dist/bootagent_0.1.0-1_amd64.deb \
#     -var validator_key=acme-validator.pem packaging/packer

variable "region" {
  type    = string
  default = "eu-west-1"
}

variable "source_ami" {
  type        = string
  description = "A Debian 12 AMI to start from."
}

variable "package" {
  type        = string
  description = "The bootagent .deb built by `make deb`."
}

variable "validator_key" {
  type        = string
  description = "The organisation's validator key; it is deleted from each instance once registered."
  sensitive   = true
}

variable "config" {
  type        = string
  default     = "packaging/packer/config.yaml"
  description = "The config baked into the image: Chef server, schedule, IMDS options."
}

source "amazon-ebs" "bootagent" {
  region        = var.region
  source_ami    = var.source_ami
  instance_type = "t3.small"
  ssh_username  = "admin"
  ami_name      = "bootagent-debian12-{{timestamp}}"

  # IMDSv2 only, tags readable from IMDS (hostname.from_tag), and a hop limit
  # of 2 so that containers on the instance can get IMDSv2 tokens too.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 2
    instance_metadata_tags      = "enabled"
  }
}

build {
  sources = ["source.amazon-ebs.bootagent"]

  provisioner "file" {
    source      = var.package
    destination = "/tmp/bootagent.deb"
  }

  provisioner "file" {
    source      = var.validator_key
    destination = "/tmp/validation.pem"
  }

  provisioner "file" {
    source      = var.config
    destination = "/tmp/bootagent-config.yaml"
  }

  provisioner "shell" {
    inline = [
      # The package enables the service but does not start it, so the
      # build machine is never registered as a node.
      "sudo apt-get install -y /tmp/bootagent.deb",
      "sudo install -D -m 0600 -o root -g root /tmp/validation.pem /etc/chef/validation.pem",
      "sudo install -m 0644 -o root -g root /tmp/bootagent-config.yaml /etc/bootagent/config.yaml",
      "shred -u /tmp/validation.pem",
      # Check the config before baking it: an invalid one exits 2.
      "echo | sudo bootagent userdata check -",
      # Last: forget anything instance-specific (nothing, if the agent never
      # ran here; state and keys, if it did).
      "sudo systemctl stop bootagent.service || true",
      "sudo bootagent clean",
    ]
  }
}
