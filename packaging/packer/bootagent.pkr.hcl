# An example Packer template that bakes bootagent into an AMI. It installs the
# package, puts the organisation's validator key and the baked config in
# place, and runs `bootagent clean` last, so that every instance launched
# from the AMI registers as itself. It needs Packer's amazon plugin
# (`packer plugins install` it, or `packer init` with your own
# required_plugins block).
#
#   make deb ARCH=amd64
#   packer build -var source_ami=ami-0123456789abcdef0 \
#     -var package=dist/bootagent_0.1.0-1_amd64.deb \
#     -var validator_key=acme-validator.pem packaging/packer
#
# For a Graviton image: `make deb ARCH=arm64`, an arm64 Debian 12 AMI,
# -var arch=arm64 -var instance_type=t4g.small and the _arm64.deb.

variable "region" {
  type    = string
  default = "eu-west-1"
}

variable "source_ami" {
  type        = string
  description = "A Debian 12 AMI to start from."
}

variable "arch" {
  type        = string
  default     = "amd64"
  description = "The image's architecture, amd64 or arm64: the source AMI's, the package's and the instance type's."
}

variable "instance_type" {
  type        = string
  default     = "t3.small"
  description = "The build instance; an arm64 image needs a Graviton type such as t4g.small."
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
  instance_type = var.instance_type
  ssh_username  = "admin"
  ami_name      = "bootagent-debian12-${var.arch}-{{timestamp}}"

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
